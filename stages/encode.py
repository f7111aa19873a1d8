"""Shared body of ``encode_public`` and ``encode_private``: posterior means of the frozen public AE,
multiplied by the public latent scale factor stored with the AE."""
from __future__ import annotations

import torch

from dpldm.config import load_section
from dpldm.data import images_to_tensor
from dpldm.models import encode_mean
from stages.artifacts import load_autoencoder
from stages.common import log_live_metrics, read_images, save_npz, setup_runtime

INPUTS = ("images", "ae")
OUTPUTS = ("latents", "live")


def run_encode(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "encode")
    device, _ = setup_runtime(params, stage=None)
    ae, conf = load_autoencoder(inputs["ae"])
    ae.to(device)
    scale = conf["latent_scale_factor"]
    arrays, metrics = {}, {"latent_scale_factor": scale}
    for split in ("train", "test"):
        x, y, _ = read_images(inputs["images"], split=split)
        z = encode_mean(ae, images_to_tensor(x), batch_size=cfg.batch_size, device=device) * scale
        arrays[f"{split}_latents"] = z.numpy()
        arrays[f"{split}_labels"] = y
        metrics[f"{split}_count"] = len(y)
        metrics[f"{split}_latent_std"] = float(z.std()) if len(z) else 0.0
    save_npz(outputs["latents"], scale_factor=torch.tensor(scale).numpy(), **arrays)
    log_live_metrics(outputs["live"], metrics)
    return metrics
