"""Sampling a trained LDM into images: the sampler (DDIM or DPM-Solver++) in batches, decoded by the autoencoder (no file I/O)."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ConfigError
from .data import tensor_to_images
from .diffusion import Sampler, resolve_precision, sample_latents


def null_class_trained(ldm_cfg) -> bool:
    """Whether pretraining trained the null class that guidance needs: only label dropout (``ldm.label_dropout`` > 0)
    shows it to the model."""
    return ldm_cfg.label_dropout > 0


def decode(ae, z: torch.Tensor, *, latent_scale: float = 1.0, precision: str = "fp32", device="cpu") -> torch.Tensor:
    """The AE decoder on the latents ``z / latent_scale``, no grad, under bf16 autocast when ``precision``
    (``sample.precision``, "auto" resolved by ``dpldm.diffusion.resolve_precision``) is bf16: float images in [-1, 1]."""
    bf16 = resolve_precision(precision, device) == "bf16"
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        return ae.decode(z / latent_scale).sample.float()


def generate(model, ae, labels: torch.Tensor, *, sampler: Sampler, batch_size: int, ldm_cfg, latent_shape,
             latent_scale: float, scheduler, generator: torch.Generator, device="cpu", show_progress: bool = True) -> np.ndarray:
    """Latents for ``labels`` drawn as ``sampler`` says, ``batch_size`` at a time, decoded by the AE: uint8 images
    (N, H, W, C). Under precision "bf16" (or "auto" where ``dpldm.diffusion.resolve_precision`` makes it bf16) the
    UNet and the decoder run under bf16 autocast; the sampler's arithmetic and the latents stay fp32."""
    if sampler.guidance_scale > 0 and not null_class_trained(ldm_cfg):
        raise ConfigError(f"params: sample.guidance_scale = {sampler.guidance_scale!r} needs the null class, but this LDM was "
                          "pretrained with ldm.label_dropout = 0, which never trains it. Set sample.guidance_scale: 0, or "
                          "pretrain with ldm.label_dropout > 0 (e.g. 0.1) and re-run pretrain_ldm onwards")
    sampler = sampler.on(device)
    images = []
    for i in tqdm(range(0, len(labels), batch_size), desc="sample", disable=not show_progress, mininterval=2.0):
        z = sample_latents(model, labels[i:i + batch_size], shape=tuple(latent_shape), scheduler=scheduler, sampler=sampler,
                           null_class=ldm_cfg.num_classes, generator=generator, device=device)
        images.append(tensor_to_images(decode(ae, z, latent_scale=latent_scale, precision=sampler.precision, device=device)))
    return np.concatenate(images)
