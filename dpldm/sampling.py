"""Sampling a trained LDM into images: the sampler (DDIM or DPM-Solver++) in batches, decoded by the autoencoder (no file I/O)."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import ConfigError
from .data import tensor_to_images
from .diffusion import resolve_precision, sample_latents


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


def generate(model, ae, labels: torch.Tensor, *, ldm_cfg, latent_shape, latent_scale: float, scheduler, steps: int,
             eta: float, guidance_scale: float, batch_size: int, generator: torch.Generator, device="cpu",
             show_progress: bool = True, precision: str = "fp32", solver: str = "ddim",
             spacing: str = "leading") -> np.ndarray:
    """Sampled latents for ``labels`` in batches, decoded by the AE: uint8 images (N, H, W, C). ``precision``
    (``sample.precision``, "auto" resolved by ``dpldm.diffusion.resolve_precision``): under "bf16" the UNet and
    the decoder run under bf16 autocast; the sampler's arithmetic and the latents stay fp32."""
    if guidance_scale > 0 and not null_class_trained(ldm_cfg):
        raise ConfigError(f"params: sample.guidance_scale = {guidance_scale!r} needs the null class, but this LDM was pretrained "
                          "with ldm.label_dropout = 0, which never trains it. Set sample.guidance_scale: 0, or pretrain "
                          "with ldm.label_dropout > 0 (e.g. 0.1) and re-run pretrain_ldm onwards")
    precision = resolve_precision(precision, device)
    images = []
    for i in tqdm(range(0, len(labels), batch_size), desc="sample", disable=not show_progress, mininterval=2.0):
        yb = labels[i:i + batch_size]
        z = sample_latents(model, yb, shape=tuple(latent_shape), scheduler=scheduler, steps=steps, eta=eta,
                           guidance_scale=guidance_scale, null_class=ldm_cfg.num_classes, generator=generator,
                           device=device, precision=precision, solver=solver, spacing=spacing)
        images.append(tensor_to_images(decode(ae, z, latent_scale=latent_scale, precision=precision, device=device)))
    return np.concatenate(images)
