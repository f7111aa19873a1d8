"""Seconds per logical step and peak memory of fine-tuning on the embedded default's shapes:
non-private attention-only, DP attention-only, DP LoRA (params.yaml's finetune.lora), DP full, at K=1 and K=4.

    python benchmarks/dp_step.py [--steps 6] [--out benchmarks/results/dp_step.md]

Uses the params.yaml LDM architecture and finetune batch sizes, random latents (timing only), and
the stage's own code (dpldm.finetune: plan_finetune, Finetuning). The random set holds
``batch_size * (steps + 1)`` rows, so one epoch is ``steps + 1`` logical steps at the params' expected
batch; the first is not timed. Each configuration runs in a fresh process so that peak RSS is its own."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("non-private attention", "attention", False, 1), ("DP attention", "attention", True, 1),
           ("DP LoRA (finetune.lora)", "lora", True, 1), ("DP full", "full", True, 1),
           ("non-private attention", "attention", False, 4), ("DP attention", "attention", True, 4),
           ("DP LoRA (finetune.lora)", "lora", True, 4), ("DP full", "full", True, 4)]


def one(mode: str, private: bool, k: int, steps: int) -> dict:
    import torch
    import yaml

    from dpldm.config import load_all
    from dpldm.finetune import Finetuning, plan_finetune
    from dpldm.models import build_ldm

    cfgs = load_all(yaml.safe_load(Path("params.yaml").read_text()))
    torch.set_num_threads(cfgs["runtime"].threads or torch.get_num_threads())
    ldm = cfgs["ldm"]
    ft = dataclasses.replace(cfgs["finetune"], mode=mode, private=private, noise_multiplicity=k)
    n = ft.batch_size * (steps + 1)
    model = build_ldm(ldm, latent_channels=4, latent_size=8)
    selection, plan = plan_finetune(model, ft, n=n)
    run = Finetuning(model, selection, plan, ft, ldm, z=torch.randn(n, 4, 8, 8), y=torch.randint(0, 10, (n,)), seed=0)
    stamps = [time.perf_counter()]
    run.run_epoch(on_step=lambda: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # the first step (warm-up) is not timed
    return {"s_per_step": sum(times) / len(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": selection.trainable_params}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results/dp_step.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, private, k = args.one.split(",")
        print(json.dumps(one(mode, private == "1", int(k), args.steps)))
        return
    rows = []
    for label, mode, private, k in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--one", f"{mode},{int(private)},{k}"],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((label, k, r))
        print(label, k, r, flush=True)
    base = {k: r["s_per_step"] for label, k, r in rows if label == "non-private attention"}
    lines = [f"{platform.machine()}, {args.steps} timed logical steps per row (first step excluded), batch from params.yaml", "",
             "| configuration | K | trainable params | s / logical step | vs non-private attention (same K) | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {k} | {r['trainable']:,} | {r['s_per_step']:.2f} | {r['s_per_step'] / base[k]:.2f}x | {r['peak_rss_mib']:.0f} |"
              for label, k, r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
