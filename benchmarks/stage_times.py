"""Wall time and peak memory of every DVC stage on the current params (the README's timing table).

    python benchmarks/stage_times.py [--out benchmarks/results/stage_times.md] [--force]

Runs ``dvc repro --single-item STAGE`` for each stage in dvc.yaml order (serially, one DVC lock),
polling the resident memory of the stage's whole process tree every 0.2 s."""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import write_table  # noqa: E402


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/stage_times.md")
    ap.add_argument("--force", action="store_true", help="re-run stages that are up to date")
    ap.add_argument("--stages", nargs="*", help="only these stages (default: all, in dvc.yaml order)")
    args = ap.parse_args()
    stages = args.stages or list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
    dvc = str(Path(sys.executable).parent / "dvc")
    rows = []
    for stage in stages:
        cmd = [dvc, "repro", "--single-item", stage] + (["--force"] if args.force else [])
        t0, peak = time.time(), 0
        proc = psutil.Popen(cmd)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc))
            time.sleep(0.2)
        if proc.returncode:
            raise SystemExit(f"{stage} failed ({proc.returncode})")
        rows.append((stage, time.time() - t0, peak / 2**20))
        print(f"{stage}: {rows[-1][1]:.1f} s, {rows[-1][2]:.0f} MiB", flush=True)
    total = sum(r[1] for r in rows)
    lines = [f"Machine: {platform.machine()}, {psutil.cpu_count()} cores, torch threads from params.yaml", "",
             "| stage | wall time (s) | peak memory (MiB) |", "|---|---:|---:|"]
    lines += [f"| {s} | {t:.0f} | {m:.0f} |" for s, t, m in rows]
    lines.append(f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | |")
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
