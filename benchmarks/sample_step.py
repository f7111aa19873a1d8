"""Where the `sample` stage's time goes on this CPU: the no-grad UNet forward per sample at several batch sizes, and at
sample.batch_size with two inexact alternatives (the GEGLU's GELU in its tanh form; explicit-softmax self-attention,
diffusers' classic `AttnProcessor`, instead of SDPA), alternated over rounds in one process so that the machine's
drift hits every variant alike; then one batch of the stage split into the sampler's steps and the AE's decoder, and
a `torch.profiler` table of the forward. params.yaml's LDM and AE, freshly initialised (timing does not depend on
the weights), random latents.

    python benchmarks/sample_step.py [--batches 100 250 500 1000] [--rounds 2] [--forwards 4] [--set sample.batch_size=250]
        [--out benchmarks/results/sample_step.md]"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor

from dpldm.config import load_all, with_overrides
from dpldm.diffusion import Sampler, make_scheduler, resolve_precision, sample_latents
from dpldm.models import build_autoencoder, build_ldm, latent_shape
from dpldm.sampling import decode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import alternated, profile_rows, ratio_rows  # noqa: E402
from provenance import provenance, write_table  # noqa: E402


def tanh_gelu(ldm) -> None:
    """Every GEGLU gate through GELU's tanh approximation (diffusers' GEGLU uses the exact, erf, form)."""
    for m in ldm.modules():
        if isinstance(m, GEGLU):
            m.gelu = lambda gate: F.gelu(gate, approximate="tanh")


def explicit_self_attention(ldm) -> None:
    """Every self-attention through diffusers' classic processor (baddbmm, softmax, bmm) instead of SDPA."""
    for m in ldm.modules():
        if isinstance(m, Attention) and not m.is_cross_attention:
            m.set_processor(AttnProcessor())


def forward_fn(ldm, batch: int, *, latent: tuple[int, ...], num_classes: int, bf16: bool = False):
    """One no-grad forward of ``ldm`` on a fixed random batch (under bf16 autocast with ``bf16``), as a closure."""
    z, y = torch.randn(batch, *latent), torch.arange(batch) % num_classes
    t = torch.full((batch,), 500, dtype=torch.long)

    @torch.no_grad()
    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ldm(z, t, y)
    return forward


def decode_fn(ae, batch: int, *, latent: tuple[int, ...], bf16: bool = False):
    """The AE decoder as the sample stage runs it (``dpldm.sampling.decode``, bf16 with ``bf16``) on a fixed random
    batch of latents, as a closure."""
    z = torch.randn(batch, *latent)
    return lambda: decode(ae, z, precision="bf16" if bf16 else "fp32")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[100, 250, 500, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--forwards", type=int, default=4, help="timed forwards per variant and round")
    ap.add_argument("--profile-forwards", type=int, default=3, help="forwards under torch.profiler (0: no profile)")
    ap.add_argument("--set", default="", help="params overrides, key=value,key=value (as pipeline.sweep --set)")
    ap.add_argument("--out", default="benchmarks/results/sample_step.md")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    from pipeline.sweep import parse_assignments

    overrides = parse_assignments(args.set) if args.set else {}
    c = load_all(with_overrides(yaml.safe_load(Path("params.yaml").read_text()), overrides))
    torch.set_num_threads(c["runtime"].threads or torch.get_num_threads())
    pub, ldm_cfg, s = c["data"].public, c["ldm"], c["sample"]
    lat = latent_shape(c["ae"], image_size=pub.image_size)
    build = lambda: build_ldm(ldm_cfg, latent_channels=lat[0], latent_size=lat[1]).eval()
    ldm, tanh_ldm, explicit_ldm = build(), build(), build()
    for other in (tanh_ldm, explicit_ldm):
        other.load_state_dict(ldm.state_dict())
    tanh_gelu(tanh_ldm)
    explicit_self_attention(explicit_ldm)

    stage = f"batch {s.batch_size}"
    forward = lambda net, batch, bf16=False: lambda: forward_fn(net, batch, latent=lat, num_classes=ldm_cfg.num_classes, bf16=bf16)
    variants = [(f"batch {b}", b, forward(ldm, b)) for b in args.batches]
    variants += [(f"{stage}, GELU's tanh form in the GEGLU", s.batch_size, forward(tanh_ldm, s.batch_size)),
                 (f"{stage}, explicit-softmax self-attention (`AttnProcessor`)", s.batch_size, forward(explicit_ldm, s.batch_size)),
                 (f"{stage}, bf16 autocast (`sample.precision: bf16`)", s.batch_size, forward(ldm, s.batch_size, bf16=True))]
    times = alternated(variants, args.rounds, args.forwards, "forward")
    native = resolve_precision("auto", "cpu")
    lines = [provenance("sample_step.py", argv, started), "",
             f"`sample.precision: auto` resolves to **{native}** on this processor (`dpldm.diffusion.native_bf16`: "
             f"{native == 'bf16'}; `sample.precision` is {s.precision}).", "",
             f"{torch.get_num_threads()} threads, {args.forwards} timed no-grad forwards per variant and round, "
             f"{args.rounds} rounds alternated; params.yaml's LDM{f' with {overrides}' if overrides else ''} "
             f"({list(ldm_cfg.block_out_channels)}, {ldm_cfg.attention_head_dim} heads, latents {lat}), freshly "
             "initialised, random latents.", "",
             "| variant | s / forward (per round) | ms / sample (median) | vs sample.batch_size |", "|---|---|---:|---:|"]
    lines += ratio_rows(variants, times, stage)

    # the AE's decoder in both precisions, alternated
    ae = build_autoencoder(c["ae"], channels=pub.channels, image_size=pub.image_size).eval()
    dec = [(f"AE decoder, batch {s.batch_size}, {'bf16 autocast' if bf else 'fp32'}", s.batch_size,
            lambda bf=bf: decode_fn(ae, s.batch_size, latent=lat, bf16=bf)) for bf in (False, True)]
    dec_times = alternated(dec, args.rounds, args.forwards, "decode")
    lines += ["", "| variant | s / decode (per round) | ms / sample (median) | vs fp32 |", "|---|---|---:|---:|"]
    lines += ratio_rows(dec, dec_times, dec[0][0])

    # one batch as the stage runs it: the sampler's steps, then the AE's decoder (both at sample.precision)
    sampler = Sampler.of(s).on("cpu")
    prec = sampler.precision
    y = torch.arange(s.batch_size) % ldm_cfg.num_classes
    t0 = time.perf_counter()
    z = sample_latents(ldm, y, shape=lat, scheduler=make_scheduler(ldm_cfg), sampler=sampler,
                       null_class=ldm_cfg.num_classes, generator=torch.Generator().manual_seed(0))
    t1 = time.perf_counter()
    decode(ae, z, precision=prec)
    t2 = time.perf_counter()
    share = (t1 - t0) / (t2 - t0)
    lines += ["", f"One batch of {s.batch_size} as the stage runs it ({s.solver}, {s.steps} steps, eta {s.eta}, guidance "
              f"{s.guidance_scale}, {s.precision} = {prec}): sampler **{t1 - t0:.2f} s** ({100 * share:.0f}%), AE decoder "
              f"**{t2 - t1:.2f} s** ({100 * (1 - share):.0f}%)."]

    if args.profile_forwards:
        lines += ["", f"`torch.profiler`, {args.profile_forwards} forwards at batch {s.batch_size} (as the stage runs): "
                  "the operators with the most self CPU time.", ""]
        lines += profile_rows(forward_fn(ldm, s.batch_size, latent=lat, num_classes=ldm_cfg.num_classes), args.profile_forwards)
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
