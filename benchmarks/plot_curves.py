"""Loss curves of a finished run as one PNG for the README (DVC's own: `dvc plots show`).

    python benchmarks/plot_curves.py [--out docs/curves.png]"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

CURVES = [("pretrain_ae", "train/recon_loss", "AE L1 reconstruction (public)", 20, "step"),
          ("pretrain_ldm", "train/loss", "LDM eps-loss (public)", 25, "step"),
          ("dp_finetune", "train/loss", "DP fine-tune eps-loss (private)", 1, "epoch"),
          ("dp_finetune", "train/epsilon_spent", "epsilon spent (PRV accountant)", 1, "epoch")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/curves.png")
    args = ap.parse_args()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3))
    for ax, (stage, metric, title, every, unit) in zip(axes, CURVES, strict=False):
        f = Path("dvclive") / stage / "plots" / "metrics" / f"{metric}.tsv"
        if f.exists():
            df = pd.read_csv(f, sep="\t")
            ax.plot((df["step"] + 1) * every, df[metric.split("/")[-1]])
        ax.set(title=title, xlabel=unit)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)


if __name__ == "__main__":
    main()
