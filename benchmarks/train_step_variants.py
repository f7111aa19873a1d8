"""The pretraining steps as the stages run them now against as they ran before 2026-12-05: the autoencoder's step
(``dpldm.training.autoencoder_loss`` at ``ae.precision`` resolved on this machine, torch's fused AdamW) against fp32
with the per-tensor AdamW loop and against the other precision with the fused AdamW (the two changes apart), and the
latent UNet's step (``dpldm.training.LDMPretraining.step``: fused AdamW, foreach EMA) against the same step with the
per-tensor AdamW loop and EMA, and under bf16 autocast (timed only: not an option of the stage). params.yaml's
shapes and batch sizes, random inputs; the variants take turns within each round so that the machine's drift hits
them alike.

    python benchmarks/train_step_variants.py [--rounds 3] [--steps 6] [--out benchmarks/results/train_step_variants.md]"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import yaml

from dpldm.config import load_all
from dpldm.diffusion import native_bf16, resolve_precision
from dpldm.models import build_autoencoder, build_ldm, latent_shape
from dpldm.training import LDMPretraining, autoencoder_loss, make_adamw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import ae_step_count, alternated  # noqa: E402
from provenance import provenance, write_table  # noqa: E402


def ae_step(cfg, *, channels: int, image_size: int, precision: str, fused: bool):
    """pretrain_ae's step on a fixed random batch: ``autoencoder_loss`` at ``precision``, AdamW fused or per tensor."""
    torch.manual_seed(0)
    ae = build_autoencoder(cfg, channels=channels, image_size=image_size)
    opt = make_adamw(ae.parameters(), lr=cfg.lr) if fused else torch.optim.AdamW(ae.parameters(), lr=cfg.lr)
    x = torch.rand(cfg.batch_size, channels, image_size, image_size) * 2 - 1

    def step():
        loss, _, _ = autoencoder_loss(ae, x, cfg, precision=precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def ldm_step(cfg, *, latent: tuple[int, int, int], fused: bool, bf16: bool = False):
    """``LDMPretraining.step`` on random latents; ``fused=False`` swaps in the per-tensor AdamW and EMA it used before;
    ``bf16`` runs the whole step under CPU bf16 autocast (not an option of the stage: timed to see whether it would pay)."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = build_ldm(cfg, latent_channels=latent[0], latent_size=latent[1])
    tr = LDMPretraining(model, cfg, z=torch.randn(2048, *latent), y=torch.randint(0, cfg.num_classes, (2048,)), seed=0)
    if not fused:
        tr.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        tr.lr_sched.optimizer = tr.opt
        tr.ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=1.0)
    if not bf16:
        return tr.step

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tr.step()
    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results/train_step_variants.md")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    c = load_all(yaml.safe_load(Path("params.yaml").read_text()))
    torch.set_num_threads(c["runtime"].threads or torch.get_num_threads())
    pub, ae_cfg, ldm_cfg = c["data"].public, c["ae"], c["ldm"]
    shape = dict(channels=pub.channels, image_size=pub.image_size)
    lat = latent_shape(ae_cfg, image_size=pub.image_size)
    now = resolve_precision(ae_cfg.precision, "cpu")
    ae_before, ae_now = "pretrain_ae before (fp32, per-tensor AdamW)", f"pretrain_ae now ({now}, fused AdamW)"
    ldm_before, ldm_now = "pretrain_ldm before (per-tensor AdamW and EMA)", "pretrain_ldm now (fused AdamW, foreach EMA)"
    variants = [(ae_before, ae_cfg.batch_size, lambda: ae_step(ae_cfg, **shape, precision="fp32", fused=False)),
                (ae_now, ae_cfg.batch_size, lambda: ae_step(ae_cfg, **shape, precision=now, fused=True))]
    # the other precision with the fused AdamW too, so that the two changes are told apart on every machine (where bf16
    # is not native it is emulated: the row shows what forcing it would cost)
    other = "fp32" if now == "bf16" else "bf16"
    variants.append((f"pretrain_ae, {other} (`ae.precision: {other}`), fused AdamW", ae_cfg.batch_size,
                     lambda: ae_step(ae_cfg, **shape, precision=other, fused=True)))
    variants += [(ldm_before, ldm_cfg.batch_size, lambda: ldm_step(ldm_cfg, latent=lat, fused=False)),
                 (ldm_now, ldm_cfg.batch_size, lambda: ldm_step(ldm_cfg, latent=lat, fused=True)),
                 # the AE's step gains 1.4x under bf16 where native: does the UNet's? (not an option of pretrain_ldm)
                 ("pretrain_ldm under bf16 autocast, fused AdamW (timed only, not an option)", ldm_cfg.batch_size,
                  lambda: ldm_step(ldm_cfg, latent=lat, fused=True, bf16=True))]
    times = alternated(variants, args.rounds, args.steps, "step")
    med = {name: statistics.median(t) for name, t in times.items()}
    lines = [provenance("train_step_variants.py", argv, started), "",
             f"{torch.get_num_threads()} threads, {args.steps} timed steps per variant and round, {args.rounds} rounds "
             f"alternated; params.yaml's shapes and batches, random inputs. `ae.precision: {ae_cfg.precision}` resolves to "
             f"**{now}** here (native bf16: {native_bf16('cpu')}).", "",
             "| step | batch | s / step (per round) | median s / step | speed-up over before |", "|---|---:|---|---:|---:|"]
    for name, batch, _ in variants:
        before = ae_before if name.startswith("pretrain_ae") else ldm_before
        lines.append(f"| {name} | {batch} | {', '.join(f'{t:.3f}' for t in times[name])} | {med[name]:.3f} | "
                     f"{med[before] / med[name]:.2f}x |")
    steps = {"pretrain_ae": ae_step_count(c), "pretrain_ldm": ldm_cfg.steps}
    saved = {k: steps[k] * (med[b] - med[n]) for k, b, n in (("pretrain_ae", ae_before, ae_now), ("pretrain_ldm", ldm_before, ldm_now))}
    lines += ["", "Implied saving per run (params.yaml's step counts x the median difference): "
              + ", ".join(f"{k} {steps[k]} steps, {s:.0f} s" for k, s in saved.items()) + "."]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
