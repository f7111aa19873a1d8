"""Which parameters to fine-tune, at CPU scale: {attention [1,7], attention [4,7], LoRA rank 4, LoRA rank 16,
full} x epsilon {1, 10}, plus non-private attention [1,7] and the public model (no fine-tuning).

    python benchmarks/ablation.py [--epochs 5] [--per-class 200] [--steps 6] [--compare-only]

Each setting is one ``dvc exp`` run by ``pipeline.sweep`` on the embedded default (the upstream stages
once; every setting re-runs dp_finetune, sample, score_fid and score_classifier), with the same
CPU-scale overrides for all (``--epochs`` of DP fine-tuning, ``--per-class`` samples per class) and
otherwise the committed params: nothing is tuned per setting, and no default is chosen from this table
(it is scored on the private test split). Every DP setting is a separate release of a model trained on
the same private data: the ledger adds their epsilons up (``epsilon_spent_all_attempts``), and the
non-private run, which comes last, voids them (``inf``).

The cost columns (trainable parameters, seconds per logical DP step, peak RSS) come from
``benchmarks/dp_step.py`` on random latents of the same shapes, not from the private runs: a timing of
those would depend on their secret Poisson batch sizes.

Writes ``benchmarks/results/ablation.md`` / ``.csv`` and the privacy-utility plot ``docs/ablation.png``
(one line per setting)."""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp_step import measure  # noqa: E402

from pipeline.sweep import comparison, plot, run_sweep  # noqa: E402
from provenance import provenance  # noqa: E402
from quality import PROTOCOL  # noqa: E402

EPSILONS = (1, 10)
VARIANTS = {  # name -> finetune overrides
    "attn1-7": {"finetune.mode": "attention", "finetune.layers": [1, 7]},
    "attn4-7": {"finetune.mode": "attention", "finetune.layers": [4, 7]},
    "lora-r4": {"finetune.mode": "lora", "finetune.layers": [1, 7], "finetune.lora.rank": 4, "finetune.lora.alpha": 4.0},
    "lora-r16": {"finetune.mode": "lora", "finetune.layers": [1, 7], "finetune.lora.rank": 16, "finetune.lora.alpha": 16.0},
    "full": {"finetune.mode": "full"},
}
NONPRIVATE = ("nonprivate-attn1-7", {**VARIANTS["attn1-7"], "finetune.private": False})
PUBLIC = ("public-only", {"finetune.mode": "none"})


def settings(common: dict) -> list[tuple[str, str, dict]]:
    """[(experiment name, variant, params)]: the DP grid, then the public model, then the non-private run
    (last: it voids the ledger's total for every attempt after it on the same data)."""
    out = [(f"abl-{v}-eps{eps}", v, {**common, **s, "finetune.epsilon": eps}) for eps in EPSILONS for v, s in VARIANTS.items()]
    out.append((f"abl-{PUBLIC[0]}", PUBLIC[0], {**common, **PUBLIC[1]}))
    out.append((f"abl-{NONPRIVATE[0]}", NONPRIVATE[0], {**common, **NONPRIVATE[1]}))
    return out


def costs(steps: int) -> dict[str, dict]:
    out = {}
    for name, overrides in [*VARIANTS.items(), NONPRIVATE]:
        out[name] = measure(overrides, steps)
        print(f"cost {name}: {out[name]}", flush=True)
    return out


def table(df: pd.DataFrame, variant_of: dict, cost: dict) -> pd.DataFrame:
    rows = []
    for _, r in df.iterrows():
        if r["experiment"] not in variant_of:
            continue
        v = variant_of[r["experiment"]]
        c = cost.get(v, {})
        dp = str(r["private"]).lower() == "true"
        rows.append({
            "setting": v, "epsilon target": r["epsilon_target"] if dp else "-",
            "epsilon spent": round(float(r["epsilon_spent"]), 3) if dp and pd.notna(r["epsilon_spent"]) else "-",
            "CNN accuracy %": f"{100 * float(r['cnn_accuracy']):.1f} ± {100 * float(r['cnn_accuracy_std']):.1f}",
            "fid_domain": round(float(r["fid_domain"]), 1),
            "trainable params": f"{int(c['trainable']):,}" if c else "0",
            "s / DP step": round(c["s_per_step"], 2) if c else "-",
            "peak RSS MiB": round(c["peak_rss_mib"]) if c else "-",
            "experiment": r["experiment"],
        })
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5, help="finetune.epochs for every setting")
    ap.add_argument("--per-class", type=int, default=200, help="sample.per_class for every setting")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per cost measurement (benchmarks/dp_step.py)")
    ap.add_argument("--compare-only", action="store_true", help="skip the runs; rebuild the table from dvc exp")
    ap.add_argument("--rerun", action="store_true", help="replace experiments of the same name")
    ap.add_argument("--out", default="benchmarks/results/ablation")
    ap.add_argument("--plot", default="docs/ablation.png")
    args = ap.parse_args()
    common = {"finetune.epochs": args.epochs, "sample.per_class": args.per_class, **PROTOCOL}
    grid = settings(common)
    started = datetime.datetime.now(datetime.timezone.utc)
    if not args.compare_only:
        run_sweep([(name, s) for name, _, s in grid], rerun=args.rerun)
    df = comparison([name for name, _, _ in grid])
    cost = costs(args.steps)
    out = table(df, {name: v for name, v, _ in grid}, cost)
    head = [provenance("ablation.py", None, started),
            f"Every setting: the embedded default with finetune.epochs={args.epochs}, sample.per_class={args.per_class}, "
            f"{PROTOCOL}, otherwise the committed params. CNN accuracy: mean ± std over the classifier seeds of one DP run.",
            "Cost columns: benchmarks/dp_step.py on random latents of the same shapes.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(f"{args.out}.csv", index=False)
    Path(f"{args.out}.md").write_text("\n".join(head) + "\n" + out.to_markdown(index=False) + "\n")
    plot(df[df["experiment"].isin(out["experiment"])], args.plot)  # not the workspace's baseline row
    print("\n".join(head) + out.to_markdown(index=False))


if __name__ == "__main__":
    main()
