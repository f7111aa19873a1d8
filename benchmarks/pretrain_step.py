"""Seconds per training step of the AE and the latent UNet at params.yaml's shapes and batch sizes,
and the pretraining time they imply (steps from params.yaml). Random inputs: timing only. The last
LDM row (diffusers' SDPA in every attention layer, as the stage ran before 2026-12-01, at batch 192 and 8
attention heads whatever params.yaml says) is the day figure that README times are quoted with: it measures
the machine, not our code.

    python benchmarks/pretrain_step.py [--steps 5] [--compile] [--out benchmarks/results/pretrain_step.md]
        [--set ae.block_out_channels=[16,32,64,64],ae.latent_channels=3]   # time another shape"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers.models.attention_processor import AttnProcessor2_0

from dpldm.config import load_all, with_overrides
from dpldm.diffusion import eps_loss, make_scheduler
from dpldm.models import build_autoencoder, build_ldm, latent_shape

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_table  # noqa: E402

DAY_FIGURE_BATCH = 192  # the LDM batch of the day figure, fixed so that figures compare across days
DAY_FIGURE_HEADS = 8    # its attention heads (ldm.attention_head_dim), fixed for the same reason
DAY_FIGURE_FF_MULT = 4  # its feed-forward width (ldm.ff_mult), fixed for the same reason


def ae_step_fn(cfg, batch: int, *, channels: int, image_size: int, memory_format=torch.contiguous_format):
    """One pretrain_ae training step (encode, sample, decode, L1 + KL, AdamW) of the AE ``cfg`` on a fixed random batch,
    as a closure."""
    ae = build_autoencoder(cfg, channels=channels, image_size=image_size).to(memory_format=memory_format)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3)
    x = torch.randn(batch, channels, image_size, image_size).contiguous(memory_format=memory_format)

    def ae_step():
        post = ae.encode(x).latent_dist
        loss = F.l1_loss(ae.decode(post.sample()).sample, x) + cfg.kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae_step


def ae_step_count(c: dict) -> int:
    """pretrain_ae's optimizer steps under the loaded params ``c``: epochs x batches of the public train split."""
    pub, ae = c["data"].public, c["ae"]
    n_train = pub.count - (pub.n_test or round(pub.test_fraction * pub.count))
    return ae.epochs * math.ceil(n_train / ae.batch_size)


def ldm_step_fn(net, batch: int, *, latent: tuple[int, ...], scheduler, num_classes: int = 10):
    """One pretrain_ldm training step (eps loss, backward, AdamW) on a fixed random batch, as a closure."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    z, y = torch.randn(batch, *latent), torch.randint(0, num_classes, (batch,))

    def ldm_step():
        loss = eps_loss(net, z, y, scheduler=scheduler).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ldm_step


def timed(step, n: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def alternated(variants, rounds: int, n: int, unit: str) -> dict[str, list[float]]:
    """Seconds per call of each variant's step, one figure per round (``timed`` over ``n`` calls). Within a round the
    variants take turns, so that a drift in the machine's speed spreads over all of them. ``variants``: (name, batch,
    make), ``make()`` building a fresh step."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for r in range(rounds):
        for name, _, make in variants:
            t = timed(make(), n)
            times[name].append(t)
            print(f"round {r + 1}: {name}: {t:.3f} s/{unit}", flush=True)
    return times


def ratio_rows(variants, times: dict[str, list[float]], reference: str) -> list[str]:
    """One markdown row per variant: its time per round, the median per example in ms, and how many times faster per
    example it is than the variant named ``reference`` ("-" when no variant has that name)."""
    batch = {name: b for name, b, _ in variants}
    base = statistics.median(times[reference]) / batch[reference] if reference in times else None
    rows = []
    for name, b, _ in variants:
        per = statistics.median(times[name]) / b
        rows.append(f"| {name} | {', '.join(f'{t:.3f}' for t in times[name])} | {per * 1000:.2f} | "
                    f"{f'{base / per:.2f}x' if base else '-'} |")
    return rows


def profile_rows(step, n: int, *, top: int = 8) -> list[str]:
    """A markdown table of the ``top`` operators with the most self CPU time over ``n`` calls of ``step`` under
    ``torch.profiler`` (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return ["| operator | self CPU % | calls |", "|---|---:|---:|"] + [
        f"| `{e.key}` | {100 * e.self_cpu_time_total / total:.1f} | {e.count} |" for e in ops]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/pretrain_step.md")
    ap.add_argument("--compile", action="store_true",
                    help="also time the LDM step under torch.compile, with its one-off compile time in the implied total")
    ap.add_argument("--set", default="", help="params overrides, key=value,key=value (as pipeline.sweep --set)")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    from pipeline.sweep import parse_assignments

    overrides = parse_assignments(args.set) if args.set else {}
    c = load_all(with_overrides(yaml.safe_load(Path("params.yaml").read_text()), overrides))
    torch.set_num_threads(c["runtime"].threads or torch.get_num_threads())
    pub = c["data"].public
    make_ae_step = lambda memory_format: ae_step_fn(c["ae"], c["ae"].batch_size, channels=pub.channels,
                                                    image_size=pub.image_size, memory_format=memory_format)

    lat = latent_shape(c["ae"], image_size=pub.image_size)
    ldm = build_ldm(c["ldm"], latent_channels=lat[0], latent_size=lat[1])
    sched = make_scheduler(c["ldm"])

    make_ldm_step = lambda net, batch: ldm_step_fn(net, batch, latent=lat, scheduler=sched)

    ae_steps = ae_step_count(c)
    rows = [("pretrain_ae (channels_last)", c["ae"].batch_size,
             timed(make_ae_step(torch.channels_last), args.steps), ae_steps, 0.0),
            ("pretrain_ae (contiguous, fp32, per-tensor AdamW: as the stage ran before 508035a)", c["ae"].batch_size,
             timed(make_ae_step(torch.contiguous_format), args.steps), ae_steps, 0.0),
            ("pretrain_ldm", c["ldm"].batch_size, timed(make_ldm_step(ldm, c["ldm"].batch_size), args.steps), c["ldm"].steps, 0.0)]
    # The day figure: diffusers' SDPA in every attention layer, as the stage ran before the one-token
    # cross-attention shortcut (dpldm.models.OneTokenCrossAttnProcessor), at the batch every earlier figure
    # used (192; ldm.batch_size was 192 until 2026-12-01), so that it compares across days.
    # Its heads and feed-forward width are pinned too: a new ldm.attention_head_dim or ldm.ff_mult must not
    # change what the day figure measures.
    reference = build_ldm(dataclasses.replace(c["ldm"], attention_head_dim=DAY_FIGURE_HEADS, ff_mult=DAY_FIGURE_FF_MULT),
                          latent_channels=lat[0], latent_size=lat[1])
    reference.unet.set_attn_processor(AttnProcessor2_0())
    rows.append(("pretrain_ldm (SDPA cross-attention: the day figure)", DAY_FIGURE_BATCH,
                 timed(make_ldm_step(reference, DAY_FIGURE_BATCH), args.steps), c["ldm"].steps, 0.0))
    if args.compile:
        step = make_ldm_step(torch.compile(ldm), c["ldm"].batch_size)
        t0 = time.perf_counter()
        step()  # compiles forward and backward
        first = time.perf_counter() - t0
        t = timed(step, args.steps)
        rows.append(("pretrain_ldm (torch.compile)", c["ldm"].batch_size, t, c["ldm"].steps, max(first - t, 0.0)))
    lines = [provenance("pretrain_step.py", argv, started), "",
             f"{platform.machine()}, {torch.get_num_threads()} threads, {args.steps} timed steps per row, random inputs"
             + (f"; overrides {overrides}" if overrides else "") + f"; latents {lat}", "",
             "| stage | batch | s / step | steps (params.yaml) | one-off compile (s) | implied training time (min) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {s} | {b} | {t:.2f} | {n} | {o:.0f} | {(o + t * n) / 60:.1f} |" for s, b, t, n, o in rows]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
