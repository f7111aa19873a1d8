"""Stages run with glibc's malloc as the stages set it (``stages.common.keep_freed_memory``: freed memory kept for
reuse) and as glibc ships it (``DPLDM_MALLOC=default``), alternated in fresh processes on the same inputs: wall time,
CPU time, page faults and peak RSS per run, and whether the two variants wrote the same bytes.

    python benchmarks/malloc_ab.py [--stages sample score_classifier] [--rounds 2] [--step-figure "0.43 s/step at 08:23"]
        [--out benchmarks/results/malloc_ab.md]

Run it in a workspace where ``dvc repro`` has run (the stages' inputs exist). Each stage runs its own ``cmd`` from
dvc.yaml with every ``--out`` and ``--state`` path redirected to a scratch folder (deleted afterwards), so the
workspace and its DVC outputs are left alone and nothing is written outside the scratch folder but the table, which
holds times only. Every run gets its own scratch outputs, so no checkpoint or ledger carries over from one run to the
next. Stages that draw from the operating system's randomness (DP noise: dp_finetune, audit) cannot write the same
bytes twice; the others must."""
from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance, write_table  # noqa: E402

VARIANTS = {"kept for reuse (the stages' setting)": "keep", "glibc default": "default"}


def redirected(cmd: str, scratch: Path) -> list[str]:
    """The stage's argv with every --out / --state NAME=PATH pointed into ``scratch`` (same file name)."""
    argv, out = shlex.split(cmd), []
    for i, a in enumerate(argv):
        if i and argv[i - 1] in ("--out", "--state"):
            name, path = a.split("=", 1)
            a = f"{name}={scratch / name / Path(path).name}"
        out.append(a)
    return [sys.executable if a == "python" else a for a in out]


def run_once(argv: list[str], env: dict) -> dict:
    """One run in a fresh process: its wall time and its own rusage. stderr goes to a file, not a pipe: a pipe nobody
    reads until the child exits would stall a stage that writes more than the pipe holds."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "minflt": ru.ru_minflt, "maxrss_mib": ru.ru_maxrss / 1024}


def differing(a: Path, b: Path) -> list[str]:
    """Files (relative paths) whose bytes differ between two output trees, or that exist in one only."""
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    return sorted(str(f) for f in files
                  if not ((a / f).is_file() and (b / f).is_file() and filecmp.cmp(a / f, b / f, shallow=False)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["sample", "encode_public", "reference", "score_classifier"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for provenance")
    ap.add_argument("--out", default="benchmarks/results/malloc_ab.md")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    unknown = [s for s in args.stages if s not in stages]
    if unknown:
        raise SystemExit(f"--stages: {', '.join(unknown)} not in dvc.yaml (stages: {', '.join(stages)})")
    runs: dict[tuple[str, str], list[dict]] = {}
    same: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="malloc_ab_") as tmp:
        for stage in args.stages:
            for r in range(args.rounds):
                for label, value in VARIANTS.items():
                    scratch = Path(tmp) / stage / value / str(r)  # a fresh one per run: no checkpoint, ledger or cache carried over
                    env = {**os.environ, "DPLDM_MALLOC": value, "DPLDM_PROGRESS": "0"}
                    res = run_once(redirected(stages[stage]["cmd"], scratch), env)
                    runs.setdefault((stage, label), []).append(res)
                    print(f"{stage} round {r + 1}, {label}: {res}", flush=True)
            same[stage] = differing(*(Path(tmp) / stage / v / str(args.rounds - 1) for v in VARIANTS.values()))
    lines = [provenance("malloc_ab.py", None, started), "",
             "# glibc malloc: freed memory kept for reuse against glibc's default, per stage", "",
             f"Fresh process per run, variants alternated, {args.rounds} round(s), torch threads from params.yaml. That day's "
             f"`benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}.", "",
             "| stage | malloc | wall (s) per run | mean wall (s) | user + sys CPU (s) | sys (s) | minor page faults | peak RSS (MiB) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for stage in args.stages:
        for label in VARIANTS:
            rs = runs[(stage, label)]
            mean = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
            walls = ", ".join(f"{r['wall']:.1f}" for r in rs)
            lines.append(f"| {stage} | {label} | {walls} | {mean['wall']:.1f} | "
                         f"{mean['user'] + mean['sys']:.1f} | {mean['sys']:.1f} | {mean['minflt']:,.0f} | {mean['maxrss_mib']:.0f} |")
    lines += ["", "| stage | default / kept (mean wall) | outputs identical (last round) |", "|---|---:|---|"]
    keep, default = VARIANTS
    for stage in args.stages:
        ratio = (sum(r["wall"] for r in runs[(stage, default)]) / sum(r["wall"] for r in runs[(stage, keep)]))
        diff = same[stage]
        lines.append(f"| {stage} | **{ratio:.2f}x** | {'yes' if not diff else 'no: ' + ', '.join(diff[:6])} |")
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
