"""Stage sample: DDIM samples of the fine-tuned LDM, balanced over classes, decoded by the AE."""
from __future__ import annotations

import numpy as np
import torch

from dpldm.diffusion import Sampler, make_scheduler
from dpldm.sampling import generate
from dpldm.config import load_section
from stages.common import (image_grid, log_live_metrics, progress_enabled, release_stamp, save_png, setup_runtime, stage_main,
                           write_images)
from stages.artifacts import load_autoencoder, load_ldm

INPUTS = ("ldm", "ae")
OUTPUTS = ("samples", "grid", "live")


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "sample")
    device, seed = setup_runtime(params, stage="sample")
    model, ldm_cfg, conf = load_ldm(inputs["ldm"])
    ae, ae_conf = load_autoencoder(inputs["ae"])
    model.to(device).eval()
    ae.to(device)
    scheduler = make_scheduler(ldm_cfg)
    sampler = Sampler.of(cfg).on(device)  # precision "auto" resolved for this device
    precision = sampler.precision
    print(f"sample: precision {cfg.precision}" + (f" -> {precision}" if precision != cfg.precision else "") + f" on {device}",
          flush=True)
    labels = torch.arange(ldm_cfg.num_classes).repeat_interleave(cfg.per_class)
    images = generate(model, ae, labels, sampler=sampler, batch_size=cfg.batch_size, ldm_cfg=ldm_cfg,
                      latent_shape=conf["latent_shape"], latent_scale=ae_conf["latent_scale_factor"], scheduler=scheduler,
                      generator=torch.Generator().manual_seed(seed), device=device, show_progress=progress_enabled())
    y = labels.numpy()
    stamp = release_stamp(conf)  # "DP release (...)" or "not a DP release: ...", from dp_finetune
    write_images(outputs["samples"], images=images, labels=y, split=["synthetic"] * len(y), source_index=np.arange(len(y)),
                 class_names=ae_conf["class_names"], source="dpldm-samples", release=stamp)
    save_png(outputs["grid"], image_grid(images, y, per_class=12, num_classes=ldm_cfg.num_classes),
             banner="" if stamp["dp_release"] else stamp["release"].upper())
    metrics = {"num_samples": len(y), "solver": cfg.solver, "spacing": cfg.spacing, "steps": cfg.steps, "eta": cfg.eta,
               "guidance_scale": cfg.guidance_scale,
               "precision": precision, "precision_setting": cfg.precision, "pixel_mean": float(images.mean() / 255.0),
               "release": stamp["release"]}
    log_live_metrics(outputs["live"], metrics)
    return metrics


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
