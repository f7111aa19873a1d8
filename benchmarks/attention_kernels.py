"""The self-attention kernels on CPU at the latent UNet's shapes (8 heads; 64 tokens of width 4 at 8x8, 16 tokens of
width 8 at 4x4), forward and backward: torch's SDPA (its CPU flash kernel, what diffusers' AttnProcessor2_0 calls),
SDPA held to its math backend, and an explicit softmax(Q K^T / sqrt d) V. Batch 128 is pretrain_ldm's, 500 the DP
step's rows (250 examples x K = 2). Random inputs; the kernels take turns within each round.

``--stage`` also times what a kernel saves where it runs: the whole pretrain_ldm training step (``pretrain_step.py``'s,
at params.yaml's model and batch) with diffusers' explicit-softmax ``AttnProcessor`` in the self-attention modules
(all of them, or only those at the lowest resolution), against the stage's processors (SDPA), taking turns.

    python benchmarks/attention_kernels.py [--rounds 3] [--reps 10] [--stage] [--out benchmarks/results/attention_kernels.md]"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance, write_table  # noqa: E402

SHAPES = [(128, 8, 64, 4), (128, 8, 16, 8), (500, 8, 64, 4), (500, 8, 16, 8)]


def kernels() -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def explicit(q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v

    def math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    return {"SDPA (flash, default)": F.scaled_dot_product_attention, "SDPA math backend": math, "explicit softmax": explicit}


def explicit_self_attention(net, *, lowest_only: bool) -> int:
    """Give diffusers' explicit-softmax ``AttnProcessor`` to the self-attention modules of ``net``'s UNet (only those
    at the lowest resolution, the most channels, when ``lowest_only``); the cross-attention keeps its processor.
    Returns how many modules changed."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    selfs = [m for m in net.unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    widest = max(m.to_q.in_features for m in selfs)
    chosen = [m for m in selfs if not lowest_only or m.to_q.in_features == widest]
    for m in chosen:
        m.set_processor(AttnProcessor())
    return len(chosen)


def stage_rows(*, rounds: int, reps: int) -> list[str]:
    """The pretrain_ldm step with each choice of self-attention kernel, as markdown rows."""
    import torch
    import yaml

    from dpldm.config import load_all
    from dpldm.diffusion import make_scheduler
    from dpldm.models import build_ldm, latent_shape
    from pretrain_step import alternated, ldm_step_fn

    c = load_all(yaml.safe_load(Path("params.yaml").read_text()))
    lat, sched, batch = latent_shape(c["ae"], image_size=c["data"].public.image_size), make_scheduler(c["ldm"]), c["ldm"].batch_size

    def make(lowest_only: bool | None):
        def build():
            torch.manual_seed(0)
            net = build_ldm(c["ldm"], latent_channels=lat[0], latent_size=lat[1])
            if lowest_only is not None:
                explicit_self_attention(net, lowest_only=lowest_only)
            return ldm_step_fn(net, batch, latent=lat, scheduler=sched)
        return build
    variants = [("SDPA everywhere (the stage)", batch, make(None)), ("explicit softmax in every self-attention", batch, make(False)),
                ("explicit softmax at the lowest resolution only", batch, make(True))]
    times = alternated(variants, rounds, reps, "step")
    base = statistics.median(times[variants[0][0]])
    return [f"| {name} | {', '.join(f'{t:.3f}' for t in times[name])} | {statistics.median(times[name]):.3f} | "
            f"{base / statistics.median(times[name]):.2f}x |" for name, _, _ in variants]


def timed(fn, q, k, v, g, *, reps: int, backward: bool) -> float:
    import torch

    with torch.set_grad_enabled(backward):
        for _ in range(2):
            out = fn(q, k, v)
            if backward:
                out.backward(g)
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(q, k, v)
            if backward:
                out.backward(g)
    return (time.perf_counter() - t) / reps * 1e3


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", action="store_true", help="also time the whole pretrain_ldm step with each kernel choice")
    ap.add_argument("--out", default="benchmarks/results/attention_kernels.md")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    torch.set_num_threads(args.threads)
    ks, times = kernels(), {}
    for shape in SHAPES:
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
        g = torch.randn(shape)
        for _ in range(args.rounds):
            for name, fn in ks.items():
                for backward in (True, False):
                    times.setdefault((shape, name, backward), []).append(timed(fn, q, k, v, g, reps=args.reps, backward=backward))
    lines = [provenance("attention_kernels.py", argv, started), "",
             f"{args.threads} torch threads; ms per call, median of {args.rounds} rounds of {args.reps} calls.", "",
             "| [batch, heads, tokens, width] | kernel | forward + backward (ms) | forward, no grad (ms) |", "|---|---|---:|---:|"]
    for shape in SHAPES:
        for name in ks:
            fb, f = (statistics.median(times[(shape, name, b)]) for b in (True, False))
            lines.append(f"| {list(shape)} | {name} | {fb:.1f} | {f:.1f} |")
    if args.stage:
        lines += ["", f"The pretrain_ldm training step (params.yaml's model and batch; forward, backward, AdamW), s per step, "
                      f"{args.rounds} rounds of {args.reps} steps, the variants taking turns:", "",
                  "| self-attention kernel | s / step, per round | median | faster than the stage |", "|---|---|---:|---:|"]
        lines += stage_rows(rounds=args.rounds, reps=args.reps)
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
