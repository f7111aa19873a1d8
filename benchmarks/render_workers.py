"""The embedded default's public set (``fontdigits``, ``data.public.count`` printed digits) rendered by one and by
several processes, alternated, checking that every run gives the same bytes: the evidence for rendering with
``runtime.threads`` processes in ``prepare_public`` (``dpldm.data.render_font_digits``'s ``workers``).

    python benchmarks/render_workers.py [--count 15000] [--workers 1 2] [--rounds 2]
        [--step-figure "0.39 s/step at 07:07 UTC"] [--out benchmarks/results/render_workers.md]

Public data only: the digits are drawn from the fonts matplotlib ships."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance, write_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=15000, help="digits (params.yaml data.public.count)")
    ap.add_argument("--seed", type=int, default=0, help="params.yaml runtime.seeds.prepare_public")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for provenance")
    ap.add_argument("--out", default="benchmarks/results/render_workers.md")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)

    from dpldm.data import render_font_digits

    rows = []
    for r in range(1, args.rounds + 1):
        for w in args.workers:
            start = time.perf_counter()
            x, y = render_font_digits(count=args.count, seed=args.seed, workers=w)
            sec = time.perf_counter() - start
            digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]
            rows.append((r, w, sec, digest))
            print(f"round {r}: {w} process(es): {sec:.1f} s, sha256 {digest}", flush=True)
    same = len({d for *_, d in rows}) == 1
    mean = {w: sum(s for _, wi, s, _ in rows if wi == w) / args.rounds for w in args.workers}
    first = args.workers[0]
    lines = [provenance("render_workers.py", None, started), "",
             f"That day's benchmarks/pretrain_step.py: {args.step_figure or 'not given'}. {args.count} digits, seed "
             f"{args.seed}.", "",
             "| round | processes | seconds | sha256 of images and labels (first 16) |", "|---:|---:|---:|---|"]
    lines += [f"| {r} | {w} | {s:.1f} | `{d}` |" for r, w, s, d in rows]
    lines += ["", "Mean seconds: " + ", ".join(f"{w} process(es) {mean[w]:.1f} (speed-up over {first}: {mean[first] / mean[w]:.2f}x)"
                                                for w in args.workers) + ".",
              f"Every run gave the same bytes: {'yes' if same else 'NO'}."]
    write_table(args.out, lines, echo=lines[-3:])
    if not same:
        raise SystemExit("the rendered digits differ between runs")


if __name__ == "__main__":
    main()
