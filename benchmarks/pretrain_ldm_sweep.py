"""Pretraining variants of the latent UNet, judged on *public* data only (invariant 7): each variant trains
pretrain_ldm's loop (``dpldm.training.LDMPretraining``) on the public train latents and reports

- the held-out public eps-loss of its EMA model, with the true labels and with the null class: the
  difference is what the class label buys (how much the model *uses* its conditioning);
- its wall time and seconds per step, measured in this process one variant after the other (same day).

    python benchmarks/pretrain_ldm_sweep.py --latents data/latents/public.npz \\
        --variant default: --variant lr2e-3:ldm.lr=0.002 --variant b96:ldm.batch_size=96,ldm.steps=1400 \\
        [--out benchmarks/results/pretrain_ldm_sweep] [--step-figure "LDM 0.30 s/step (date)"]

A variant is ``name:key=value,key=value`` (the keys of params.yaml, as ``pipeline.sweep --set``)."""
from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from dpldm.config import load_all, load_section, with_overrides
from dpldm.models import build_ldm
from dpldm.training import LDMPretraining, heldout_loss
from stages.common import load_latents

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, with_ext, write_table  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    from pipeline.sweep import parse_assignments

    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected name:key=value,... (name: alone for the defaults)")
    return name, parse_assignments(rest) if rest else {}


def overrides_label(over: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in over.items()) or "(defaults)"


def load_splits(path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train latents, train labels, held-out latents, held-out labels) of an encode stage's .npz."""
    return (*load_latents(path), *load_latents(path, "test"))


def write_rows(out: Path, rows: list[dict]) -> None:
    """``out``.csv with one row per run (the folder is made if missing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(with_ext(out, ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run_variant(params: dict, overrides: dict, z, y, zt, yt, seed: int) -> dict:
    cfg = load_section(with_overrides(params, overrides), "ldm")
    torch.manual_seed(seed)
    model = build_ldm(cfg, latent_channels=z.shape[1], latent_size=z.shape[2])
    tr = LDMPretraining(model, cfg, z=z, y=y, seed=seed)
    t0 = time.perf_counter()
    losses = [tr.step() for _ in tqdm(range(cfg.steps), desc=str(overrides or "defaults"), mininterval=10)]
    wall = time.perf_counter() - t0
    model = tr.finish()
    null = torch.full_like(yt, cfg.num_classes)
    true_loss = heldout_loss(model, zt, yt, cfg=cfg)
    null_loss = heldout_loss(model, zt, null, cfg=cfg)
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "examples": cfg.steps * cfg.batch_size,
            "train_loss_last50": float(np.mean(losses[-50:])), "heldout_loss": true_loss, "heldout_loss_null": null_loss,
            "label_gain": null_loss - true_loss, "wall_s": wall, "s_per_step": wall / cfg.steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", default="data/latents/public.npz", help="pretrain_ldm's input (public latents)")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/pretrain_ldm_sweep")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for the provenance")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    params = yaml.safe_load(Path("params.yaml").read_text())
    torch.set_num_threads(load_all(params)["runtime"].threads or torch.get_num_threads())
    z, y, zt, yt = load_splits(args.latents)
    rows = []
    for text in args.variant:
        name, over = parse_variant(text)
        r = {"variant": name, "overrides": overrides_label(over),
             **run_variant(params, over, z, y, zt, yt, args.seed)}
        rows.append(r)
        print({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    out = Path(args.out)
    write_rows(out, rows)
    lines = [provenance("pretrain_ldm_sweep.py", None, started), "",
             "# Pretraining variants judged on the held-out public latents", "",
             f"{torch.get_num_threads()} torch threads, {len(z)} public train / {len(zt)} held-out latents, seed {args.seed}. "
             f"That day's `benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}.", "",
             "| variant | overrides | steps x batch | held-out loss (EMA) | with the null class | label gain | s / step | wall (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | `{r['overrides']}` | {r['steps']} x {r['batch_size']} | {r['heldout_loss']:.4f} | "
                     f"{r['heldout_loss_null']:.4f} | {r['label_gain']:.4f} | {r['s_per_step']:.2f} | {r['wall_s']:.0f} |")
    write_table(with_ext(out, ".md"), lines)


if __name__ == "__main__":
    main()
