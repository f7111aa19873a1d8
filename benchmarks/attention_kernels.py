"""The self-attention kernels on CPU at the latent UNet's shapes (8 heads; 64 tokens of width 4 at 8x8, 16 tokens of
width 8 at 4x4), forward and backward: torch's SDPA (its CPU flash kernel, what diffusers' AttnProcessor2_0 calls),
SDPA held to its math backend, and an explicit softmax(Q K^T / sqrt d) V. Batch 128 is pretrain_ldm's, 500 the DP
step's rows (250 examples x K = 2). Random inputs; the kernels take turns within each round.

    python benchmarks/attention_kernels.py [--rounds 3] [--reps 10] [--out benchmarks/results/attention_kernels.md]"""
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
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
