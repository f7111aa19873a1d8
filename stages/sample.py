"""Stage sample: DDIM samples of the fine-tuned LDM, balanced over classes, decoded by the AE."""
from __future__ import annotations

import numpy as np
import torch

from dpldm.data import tensor_to_images
from dpldm.diffusion import ddim_sample, make_scheduler
from dpldm.config import load_section
from stages.common import (image_grid, log_live_metrics, progress, release_stamp, save_png, seed_of, setup_runtime, stage_main,
                           write_images)
from stages.encode import load_autoencoder
from stages.pretrain_ldm import load_ldm

INPUTS = ("ldm", "ae")
OUTPUTS = ("samples", "grid", "live")


def generate(model, ae, labels: torch.Tensor, *, ldm_cfg, latent_shape, latent_scale: float, scheduler, steps: int,
             eta: float, guidance_scale: float, batch_size: int, generator: torch.Generator, device="cpu") -> np.ndarray:
    """DDIM latents for ``labels`` in batches, decoded by the AE: uint8 images (N, H, W, C)."""
    images = []
    for i in progress(range(0, len(labels), batch_size), desc="sample"):
        yb = labels[i:i + batch_size]
        z = ddim_sample(model, yb, shape=tuple(latent_shape), scheduler=scheduler, steps=steps, eta=eta,
                        guidance_scale=guidance_scale, null_class=ldm_cfg.num_classes, generator=generator, device=device)
        with torch.no_grad():
            images.append(tensor_to_images(ae.decode(z / latent_scale).sample))
    return np.concatenate(images)


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "sample")
    seed = seed_of(params, "sample")
    device = setup_runtime(params, seed=seed)
    model, ldm_cfg, conf = load_ldm(inputs["ldm"])
    ae, ae_conf = load_autoencoder(inputs["ae"])
    model.to(device).eval()
    ae.to(device)
    scheduler = make_scheduler(ldm_cfg)
    labels = torch.arange(ldm_cfg.num_classes).repeat_interleave(cfg.per_class)
    images = generate(model, ae, labels, ldm_cfg=ldm_cfg, latent_shape=conf["latent_shape"],
                      latent_scale=ae_conf["latent_scale_factor"], scheduler=scheduler, steps=cfg.steps, eta=cfg.eta,
                      guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size,
                      generator=torch.Generator().manual_seed(seed), device=device)
    y = labels.numpy()
    stamp = release_stamp(conf)  # "DP release (...)" or "not a DP release: ...", from dp_finetune
    write_images(outputs["samples"], images=images, labels=y, split=["synthetic"] * len(y), source_index=np.arange(len(y)),
                 class_names=ae_conf["class_names"], source="dpldm-samples", release=stamp)
    save_png(outputs["grid"], image_grid(images, y, per_class=12, num_classes=ldm_cfg.num_classes),
             banner="" if stamp["dp_release"] else stamp["release"].upper())
    metrics = {"num_samples": len(y), "ddim_steps": cfg.steps, "eta": cfg.eta, "guidance_scale": cfg.guidance_scale,
               "pixel_mean": float(images.mean() / 255.0), "release": stamp["release"]}
    log_live_metrics(outputs["live"], metrics)
    return metrics


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
