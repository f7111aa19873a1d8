"""The downstream scikit-learn grids (``dpldm.metrics.fit_sklearn``'s logistic regression and MLP, params.yaml's
``classifier`` settings) timed at one and at two BLAS threads, alternated, on the same images: the evidence for
running the logistic regression on one BLAS thread (``fit_sklearn``'s default).

    python benchmarks/sklearn_threads.py [--images data/public/images.parquet] [--n 10000] [--rounds 2]
        [--step-figure "0.58 s/step at 01:11 UTC"] [--out benchmarks/results/sklearn_threads.md]

Public images by default (the embedded default's printed digits, after ``dvc repro prepare_public``): the timing
does not depend on whose images they are, and nothing private is read. 90% train, 10% validation, as
``classifier.val_fraction``."""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance, write_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="data/public/images.parquet")
    ap.add_argument("--n", type=int, default=10000, help="images used (as the 10,000 synthetic digits)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for provenance")
    ap.add_argument("--out", default="benchmarks/results/sklearn_threads.md")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)

    import numpy as np

    from dpldm.config import load_section
    from dpldm.metrics import fit_sklearn
    from stages.common import read_images, read_params

    cfg = load_section(read_params("params.yaml"), "classifier")
    settings = {"logreg_C": cfg.logreg_C, "mlp_hidden": cfg.mlp_hidden, "mlp_max_iter": cfg.mlp_max_iter}

    warnings.filterwarnings("ignore", message=".*Maximum iterations.*")
    x, y, _ = read_images(args.images, split="train")
    x, y = x[:args.n], y[:args.n]
    n_val = len(y) // 10
    xt, yt, xv, yv = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    rows = []
    for r in range(1, args.rounds + 1):
        for limit in (2, 1):
            for kind in ("logreg", "mlp"):
                start = time.perf_counter()
                _, choice, acc = fit_sklearn(kind, xt, yt, xv, yv, seed=0, blas_threads=limit, **settings)
                sec = time.perf_counter() - start
                rows.append((r, kind, limit, sec, choice, acc))
                print(f"round {r}: {kind} grid, {limit} BLAS thread(s): {sec:.1f} s (choice {choice}, val {acc:.4f})",
                      flush=True)
    lines = [provenance("sklearn_threads.py", None, started), "",
             f"That day's benchmarks/pretrain_step.py: {args.step_figure or 'not given'}. {len(yt)} train / {len(yv)} "
             f"validation images from `{args.images}`.", "",
             "| round | grid | BLAS threads | seconds | choice | validation accuracy |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r} | {k} | {lim} | {s:.1f} | {c:g} | {a:.4f} |" for r, k, lim, s, c, a in rows]
    for kind in ("logreg", "mlp"):
        t = {lim: np.mean([s for _, k, li, s, _, _ in rows if k == kind and li == lim]) for lim in (1, 2)}
        lines.append("")
        lines.append(f"{kind}: mean {t[2]:.1f} s at 2 BLAS threads, {t[1]:.1f} s at 1 ({t[2] / t[1]:.2f}x).")
    write_table(args.out, lines, echo=lines[-4:])


if __name__ == "__main__":
    main()
