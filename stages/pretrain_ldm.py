"""Stage pretrain_ldm: the class-conditional latent UNet on *public* latents.

AdamW with warm-up and optional cosine decay, label dropout (null class, for guidance), EMA
weights (the stage's output), and a checkpoint every ``ldm.checkpoint_every`` steps: an
interrupted run resumes from it and ends where an uninterrupted run would."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from dpldm.config import load_section, to_dict
from dpldm.diffusion import eps_loss, make_scheduler
from dpldm.models import ConditionalUNet, attention_modules, build_ldm
from stages.common import atomic_path, file_sha, live, progress, save_model, seed_of, setup_runtime, stage_main

INPUTS = ("latents",)
OUTPUTS = ("model", "checkpoint", "live")


def _from_pretrained(model: ConditionalUNet, path: Path) -> None:
    """A user's diffusers-format UNet folder (``unet/``) and optional ``class_embedder.pt``."""
    from diffusers import UNet2DConditionModel

    model.unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True)
    if (path / "class_embedder.pt").exists():
        model.class_embedder.load_state_dict(torch.load(path / "class_embedder.pt", weights_only=True))


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "ldm")
    seed = seed_of(params, "pretrain_ldm")
    device = setup_runtime(params, seed=seed)
    data = np.load(inputs["latents"])
    z, y = torch.from_numpy(data["train_latents"]), torch.from_numpy(data["train_labels"]).long()
    shape = tuple(z.shape[1:])
    model = build_ldm(cfg, latent_channels=shape[0], latent_size=shape[1])
    if cfg.pretrained_path:
        _from_pretrained(model, Path(cfg.pretrained_path))
    model.to(device)
    scheduler = make_scheduler(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    make_sched = get_cosine_schedule_with_warmup if cfg.cosine_decay else get_constant_schedule_with_warmup
    kwargs = {"num_training_steps": cfg.steps} if cfg.cosine_decay else {}
    lr_sched = make_sched(opt, num_warmup_steps=cfg.warmup_steps, **kwargs)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    g = torch.Generator().manual_seed(seed)
    step = 0
    ckpt = Path(outputs["checkpoint"]) / "state.pt"
    run_key = {"ldm": to_dict(cfg), "latents_sha": file_sha(inputs["latents"]), "seed": seed}
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["run_key"] == run_key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            lr_sched.load_state_dict(state["lr_sched"])
            ema.load_state_dict(state["ema"])
            g.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            step = state["step"]
            print(f"pretrain_ldm: resuming from step {step} of {cfg.steps}")
    stop_after = int(os.environ.get("DPLDM_STOP_AFTER_STEP", "0"))  # simulate a crash (tests)
    null = cfg.num_classes
    losses = []
    with live(outputs["live"]) as lv:
        bar = progress(total=cfg.steps, initial=step, desc="pretrain_ldm")
        model.train()
        while step < cfg.steps:
            idx = torch.randint(0, len(z), (cfg.batch_size,), generator=g)
            yb = y[idx].clone()
            drop = torch.rand(len(yb), generator=g) < cfg.label_dropout
            yb[drop] = null
            loss = eps_loss(model, z[idx].to(device), yb.to(device), scheduler=scheduler, generator=g).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            ema.step(model.parameters())
            step += 1
            bar.update(1)
            losses.append(float(loss.detach()))
            if step % 25 == 0 or step == cfg.steps:
                lv.log_metric("train/loss", float(np.mean(losses[-25:])))
                lv.log_metric("train/lr", lr_sched.get_last_lr()[0])
                lv.next_step()
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                with atomic_path(ckpt) as tmp:
                    torch.save({"run_key": run_key, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                                "lr_sched": lr_sched.state_dict(), "ema": ema.state_dict(), "generator": g.get_state(),
                                "torch_rng": torch.get_rng_state()}, tmp)
                if stop_after and step >= stop_after:
                    raise SystemExit(f"pretrain_ldm: stopped after step {step} (DPLDM_STOP_AFTER_STEP)")
        bar.close()
        ema.copy_to(model.parameters())
        model.eval()
        # held-out public loss of the EMA model, at fixed draws
        zt, yt = torch.from_numpy(data["test_latents"]), torch.from_numpy(data["test_labels"]).long()
        with torch.no_grad():
            gt = torch.Generator().manual_seed(1234)
            test_loss = float(torch.cat([eps_loss(model, zt[i:i + 500].to(device), yt[i:i + 500].to(device), scheduler=scheduler,
                                                  generator=gt) for i in range(0, len(zt), 500)]).mean()) if len(zt) else float("nan")
        mods = attention_modules(model)
        metrics = {"steps": cfg.steps, "final_train_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
                   "test_loss_ema": test_loss, "num_params": sum(p.numel() for p in model.parameters()),
                   "attention_modules": len(mods), "attention_params": sum(m.num_params for m in mods)}
        for k, v in metrics.items():
            lv.log_metric(k, v, plot=False)
    save_model(outputs["model"], state_dict=model.cpu().state_dict(), config=to_dict(cfg),
               extra={"latent_shape": list(shape), "attention_modules": [m.__dict__ for m in mods]})
    return metrics


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
