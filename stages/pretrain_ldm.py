"""Stage pretrain_ldm: the class-conditional latent UNet on *public* latents.

AdamW with warm-up and optional cosine decay, label dropout (null class, for guidance), EMA
weights (the stage's output), and a checkpoint every ``ldm.checkpoint_every`` steps: an
interrupted run resumes from it and ends where an uninterrupted run would."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dpldm.config import load_section, to_dict
from dpldm.models import ConditionalUNet, attention_modules, build_ldm
from dpldm.training import LDMPretraining, heldout_loss
from stages.common import Checkpoint, file_sha, live, load_latents, progress, save_model, setup_runtime, stage_main

INPUTS = ("latents",)
OUTPUTS = ("model", "live")
STATE = ("checkpoint",)  # resumable state: not a DVC output (stages.common.parse_args)


def _from_pretrained(model: ConditionalUNet, path: Path) -> None:
    """A user's diffusers-format UNet folder (``unet/``) and optional ``class_embedder.pt``."""
    from diffusers import UNet2DConditionModel

    model.unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True)
    if (path / "class_embedder.pt").exists():
        model.class_embedder.load_state_dict(torch.load(path / "class_embedder.pt", weights_only=True))


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "ldm")
    device, seed = setup_runtime(params, stage="pretrain_ldm")
    z, y = load_latents(inputs["latents"])
    shape = tuple(z.shape[1:])
    model = build_ldm(cfg, latent_channels=shape[0], latent_size=shape[1])
    if cfg.pretrained_path:
        _from_pretrained(model, Path(cfg.pretrained_path))
    tr = LDMPretraining(model, cfg, z=z, y=y, seed=seed, device=device)
    ckpt = Checkpoint(Path(outputs["checkpoint"]) / "state.pt",
                      {"ldm": to_dict(cfg), "latents_sha": file_sha(inputs["latents"]), "seed": seed})
    state = ckpt.load()
    if state is not None:
        tr.load_state_dict(state)
        print(f"pretrain_ldm: resuming from step {tr.step_count} of {cfg.steps}")
    stop_after = int(os.environ.get("DPLDM_STOP_AFTER_STEP", "0"))  # simulate a crash (tests)
    losses = []
    with live(outputs["live"]) as lv:
        bar = progress(total=cfg.steps, initial=tr.step_count, desc="pretrain_ldm")
        while tr.step_count < cfg.steps:
            losses.append(tr.step())
            bar.update(1)
            step = tr.step_count
            if step % 25 == 0 or step == cfg.steps:
                lv.log_metric("train/loss", float(np.mean(losses[-25:])))
                lv.log_metric("train/lr", tr.lr)
                lv.next_step()
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                ckpt.save(tr.state_dict())
                if stop_after and step >= stop_after:
                    raise SystemExit(f"pretrain_ldm: stopped after step {step} (DPLDM_STOP_AFTER_STEP)")
        bar.close()
        model = tr.finish()
        zt, yt = load_latents(inputs["latents"], "test")
        mods = attention_modules(model)
        metrics = {"steps": cfg.steps, "final_train_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
                   "test_loss_ema": heldout_loss(model, zt, yt, cfg=cfg, device=device),  # held-out public loss, EMA model
                   "num_params": sum(p.numel() for p in model.parameters()),
                   "attention_modules": len(mods), "attention_params": sum(m.num_params for m in mods)}
        for k, v in metrics.items():
            lv.log_metric(k, v, plot=False)
    save_model(outputs["model"], state_dict=model.cpu().state_dict(), config=to_dict(cfg),
               extra={"latent_shape": list(shape), "attention_modules": [m.__dict__ for m in mods]})
    return metrics


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, state=STATE, argv=argv)


if __name__ == "__main__":
    main()
