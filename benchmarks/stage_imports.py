"""What each stage pays before its first line of work: the seconds `python -c "import stages.<name>"` takes in a fresh
process (the median of --rounds, the stages taking turns within a round), and which heavy libraries that import pulls
in. Every DVC stage is its own process, so a make repro pays each of these once per stage.

    python benchmarks/stage_imports.py [--rounds 3] [--out benchmarks/results/stage_imports.md]

The first round reads the files from disk if they are not in the page cache yet (a fresh clone's venv mostly is, just
installed); it is reported beside the median of the rest."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from provenance import provenance, write_table  # noqa: E402
from repro_time import STAGE_RE  # noqa: E402

from pipeline.boundary import read_stages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "peft", "transformers", "torch._dynamo", "torchvision", "torch_fidelity", "opacus", "sklearn",
         "scipy", "matplotlib", "dvclive", "prefect")


def stage_modules() -> list[str]:
    """The stage modules dvc.yaml's stages run (`python -m stages.<name>` in each cmd), in file order, without duplicates."""
    found = (STAGE_RE.search(st["cmd"]) for st in read_stages(ROOT).values())
    return list(dict.fromkeys(m.group(1) for m in found if m))


def one_import(stage: str) -> tuple[float, list[str]]:
    """Seconds to import ``stages.<stage>`` in a fresh interpreter (start-up included), and the HEAVY modules loaded."""
    code = (f"import sys, json, stages.{stage}; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"import stages.{stage} failed:\n{out.stderr[-2000:]}")
    return seconds, json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/stage_imports.md")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        raise SystemExit(f"--rounds {args.rounds}: needs at least 2 (the first round is reported apart)")
    started = datetime.datetime.now(datetime.timezone.utc)
    stages = stage_modules()
    times: dict[str, list[float]] = {s: [] for s in stages}
    loaded: dict[str, list[str]] = {}
    for r in range(args.rounds):
        for s in stages:
            t, mods = one_import(s)
            times[s].append(t)
            loaded[s] = mods
            print(f"round {r + 1}: stages.{s}: {t:.2f} s", flush=True)
    rows = [(s, times[s][0], statistics.median(times[s][1:]), loaded[s]) for s in stages]
    lines = [provenance("stage_imports.py", argv, started), "",
             f"{platform.machine()}, {args.rounds} rounds, one fresh process per import", "",
             "| stage module | first round (s) | median of the rest (s) | heavy libraries it loads |", "|---|---:|---:|---|"]
    lines += [f"| `stages.{s}` | {first:.2f} | {med:.2f} | {', '.join(mods) or '-'} |" for s, first, med, mods in rows]
    lines += ["", f"Sum over the {len(rows)} stages (median of the rest): {sum(m for _, _, m, _ in rows):.1f} s"]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
