"""Seconds per logical step and peak memory of fine-tuning on the embedded default's shapes:
non-private attention-only, DP attention-only, DP LoRA (params.yaml's finetune.lora), DP full, at K=1 and K=4.

    python benchmarks/dp_step.py [--steps 6] [--out benchmarks/results/dp_step.md]
    python benchmarks/dp_step.py --ab cross-attention   # -> benchmarks/results/dp_step_cross_attention.md
    python benchmarks/dp_step.py --ab fold              # -> benchmarks/results/dp_step_fold.md

``--ab``: params.yaml's own fine-tuning (DP, its K), the default against what it replaced, alternated in
fresh processes (A B A B ...) so that a drifting machine affects both alike. ``cross-attention``: the
one-token cross-attention shortcut (dpldm.models.OneTokenCrossAttnProcessor) against diffusers' SDPA
processor; ``fold``: the K-average formed in opacus' hooks (dpldm.privacy.KFoldedGradSampleModule)
against per-row gradients averaged by the optimizer.

Uses the params.yaml LDM architecture and finetune batch sizes, random latents (timing only), and
the stage's own code (dpldm.finetune: plan_finetune, Finetuning). The random set holds
``batch_size * (steps + 1)`` rows, so one epoch is ``steps + 1`` logical steps at the params' expected
batch; the first is not timed. Each configuration runs in a fresh process so that peak RSS is its own."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import provenance, write_table

CONFIGS = [(label, {"finetune.mode": mode, "finetune.private": private, "finetune.noise_multiplicity": k})
           for k in (1, 4) for label, mode, private in
           (("non-private attention", "attention", False), ("DP attention", "attention", True),
            ("DP LoRA (finetune.lora)", "lora", True), ("DP full", "full", True))]


def one(overrides: dict, steps: int) -> dict:
    import torch
    import yaml
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dpldm.config import load_all, with_overrides
    from dpldm.finetune import Finetuning, plan_finetune
    from dpldm.models import build_ldm

    sdpa_cross_attention = overrides.pop("_sdpa_cross_attention", False)
    if overrides.pop("_per_row_gradients", False):
        import functools

        import dpldm.finetune
        dpldm.finetune.make_private = functools.partial(dpldm.finetune.make_private, fold_in_hooks=False)
    cfgs = load_all(with_overrides(yaml.safe_load(Path("params.yaml").read_text()), overrides))
    torch.set_num_threads(cfgs["runtime"].threads or torch.get_num_threads())
    ldm, ft = cfgs["ldm"], cfgs["finetune"]
    n = ft.batch_size * (steps + 1)
    model = build_ldm(ldm, latent_channels=4, latent_size=8)
    if sdpa_cross_attention:
        model.unet.set_attn_processor(AttnProcessor2_0())
    selection, plan = plan_finetune(model, ft, n=n)
    run = Finetuning(model, selection, plan, ft, ldm, z=torch.randn(n, 4, 8, 8), y=torch.randint(0, 10, (n,)), seed=0)
    stamps = [time.perf_counter()]
    run.run_epoch(on_step=lambda: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # the first step (warm-up) is not timed
    return {"s_per_step": sum(times) / len(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": selection.trainable_params}


def measure(overrides: dict, steps: int) -> dict:
    """``one`` in a fresh process (so that its peak RSS is its own): {s_per_step, peak_rss_mib, trainable}."""
    out = subprocess.run([sys.executable, __file__, "--steps", str(steps), "--one", json.dumps(overrides)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"dp_step {overrides} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", help="default benchmarks/results/dp_step.md; with --ab, dp_step_<name>.md")
    ap.add_argument("--ab", choices=sorted(AB))
    ap.add_argument("--repeats", type=int, default=2, help="--ab: A/B pairs")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # JSON {dotted params key: value}
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one), args.steps)))
        return
    if args.ab:
        args.out = args.out or f"benchmarks/results/dp_step_{args.ab.replace('-', '_')}.md"
        ab(args)
        return
    args.out = args.out or "benchmarks/results/dp_step.md"
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for label, overrides in CONFIGS:
        k = overrides["finetune.noise_multiplicity"]
        r = measure(overrides, args.steps)
        rows.append((label, k, r))
        print(label, k, r, flush=True)
    base = {k: r["s_per_step"] for label, k, r in rows if label == "non-private attention"}
    lines = [provenance("dp_step.py", None, started), "",
             f"{platform.machine()}, {args.steps} timed logical steps per row (first step excluded), batch from params.yaml", "",
             "| configuration | K | trainable params | s / logical step | vs non-private attention (same K) | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {k} | {r['trainable']:,} | {r['s_per_step']:.2f} | {r['s_per_step'] / base[k]:.2f}x | {r['peak_rss_mib']:.0f} |"
              for label, k, r in rows]
    write_table(args.out, lines)


AB = {
    "cross-attention": ("cross-attention", [("one-token shortcut (default)", {}),
                                            ("diffusers SDPA (before)", {"_sdpa_cross_attention": True})]),
    "fold": ("per-example gradients", [("K rows folded in opacus' hooks (default)", {}),
                                       ("per-row, averaged by the optimizer (before)", {"_per_row_gradients": True})]),
}


def ab(args) -> None:
    started = datetime.datetime.now(datetime.timezone.utc)
    what, variants = AB[args.ab]
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    for _ in range(args.repeats):
        for label, overrides in variants:
            r = measure(dict(overrides), args.steps)
            times[label].append(r["s_per_step"])
            print(label, r, flush=True)
    base = statistics.mean(times[variants[1][0]])
    lines = [provenance("dp_step.py", None, started), "",
             f"{platform.machine()}, params.yaml's fine-tuning (DP attention, its K and batch), {args.steps} timed logical steps "
             f"per process (first excluded), {args.repeats} processes per variant, alternated", "",
             f"| {what} | s / logical step (each process) | mean | vs before |", "|---|---|---:|---:|"]
    lines += [f"| {label} | {', '.join(f'{t:.2f}' for t in ts)} | {statistics.mean(ts):.2f} | {statistics.mean(ts) / base:.2f}x |"
              for label, ts in times.items()]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
