"""Pretraining of the class-conditional latent UNet on public latents, as one resumable object.

AdamW with warm-up and optional cosine decay, gradient clipping at 1, label dropout to the null
class (for classifier-free guidance), EMA weights. ``state_dict()`` holds everything a resumed run
needs to end exactly where an uninterrupted one would. No file I/O: the stage saves it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from .config import AEConfig, LDMConfig
from .diffusion import eps_loss, make_scheduler
from .models import ConditionalUNet


def make_ema(parameters, decay: float) -> EMAModel:
    """diffusers' EMA whose decay really reaches ``decay``: the exact mean of the iterates while fewer than
    ``1 / (1 - decay)`` steps have passed, then the exponential average at ``decay``.

    diffusers' default warm-up caps the decay at ``n / (n + 9)`` after n steps (0.973 after 320, 0.987
    after 700): a configured 0.99 or 0.995 was never reached, and every value above that cap gave the
    same EMA weights. The inverse-gamma warm-up with gamma = 1 and power = 1 gives ``1 - 1 / n``, capped at ``decay``."""
    return EMAModel(parameters, decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=1.0, foreach=True)


def make_adamw(parameters, *, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel (CPU and CUDA): the same update as the per-tensor loop torch runs on a CPU by
    default, in one pass over all tensors (``benchmarks/train_step_variants.py``)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)


def autoencoder_loss(ae, x: torch.Tensor, cfg: AEConfig, *, precision: str = "fp32"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pretrain_ae's objective on a batch ``x``: (loss, reconstruction loss, KL per pixel), all fp32.

    ``precision`` "bf16" (``ae.precision`` resolved by ``dpldm.diffusion.resolve_precision``) runs the encoder's and the
    decoder's convolutions under bf16 autocast; the posterior's moments, the sampled latent and the loss stay fp32, and
    the weights, gradients and optimizer state are fp32 either way."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autoencoder_loss: precision {precision!r}; expected 'fp32' or 'bf16' (resolve 'auto' first)")
    bf16 = precision == "bf16"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        moments = ae.encode(x).latent_dist.parameters
    posterior = DiagonalGaussianDistribution(moments.float())
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        recon = ae.decode(posterior.sample(generator=None)).sample
    recon = recon.float()
    rec = F.l1_loss(recon, x) if cfg.recon_loss == "l1" else F.mse_loss(recon, x)
    kl = posterior.kl().mean() / x[0].numel()
    return rec + cfg.kl_weight * kl, rec, kl


class LDMPretraining:
    def __init__(self, model: ConditionalUNet, cfg: LDMConfig, *, z: torch.Tensor, y: torch.Tensor, seed: int,
                 device: torch.device | str = "cpu"):
        self.model, self.cfg, self.z, self.y, self.device = model.to(device), cfg, z, y, device
        self.scheduler = make_scheduler(cfg)
        self.opt = make_adamw(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        if cfg.cosine_decay:
            self.lr_sched = get_cosine_schedule_with_warmup(self.opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
        else:
            self.lr_sched = get_constant_schedule_with_warmup(self.opt, num_warmup_steps=cfg.warmup_steps)
        self.ema = make_ema(model.parameters(), cfg.ema_decay)
        self.g = torch.Generator().manual_seed(seed)
        self.step_count = 0

    def step(self) -> float:
        """One optimizer step on a uniformly drawn batch; returns its loss."""
        cfg, model = self.cfg, self.model
        model.train()
        idx = torch.randint(0, len(self.z), (cfg.batch_size,), generator=self.g)
        yb = self.y[idx].clone()
        yb[torch.rand(len(yb), generator=self.g) < cfg.label_dropout] = cfg.num_classes  # the null class
        loss = eps_loss(model, self.z[idx].to(self.device), yb.to(self.device), scheduler=self.scheduler, generator=self.g,
                        snr_gamma=self.cfg.snr_gamma).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()
        self.lr_sched.step()
        self.ema.step(model.parameters())
        self.step_count += 1
        return float(loss.detach())

    @property
    def lr(self) -> float:
        return self.lr_sched.get_last_lr()[0]

    def finish(self) -> ConditionalUNet:
        """The EMA weights into the model (the stage's output)."""
        self.ema.copy_to(self.model.parameters())
        return self.model.eval()

    def state_dict(self) -> dict:
        return {"step": self.step_count, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "lr_sched": self.lr_sched.state_dict(), "ema": self.ema.state_dict(), "generator": self.g.get_state(),
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.ema.load_state_dict(state["ema"])
        self.g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step_count = state["step"]


@torch.no_grad()
def heldout_loss(model: ConditionalUNet, z: torch.Tensor, y: torch.Tensor, *, cfg: LDMConfig, seed: int = 1234,
                 batch_size: int = 500, device: torch.device | str = "cpu", t_range: tuple[int, int] | None = None) -> float:
    """Mean eps-loss over (z, y) at fixed (t, noise) draws (t uniform on [0, T), or on ``t_range``); NaN for an empty set."""
    if not len(z):
        return float("nan")
    scheduler, g = make_scheduler(cfg), torch.Generator().manual_seed(seed)
    return float(torch.cat([eps_loss(model, z[i:i + batch_size].to(device), y[i:i + batch_size].to(device), scheduler=scheduler,
                                     generator=g, t_range=t_range) for i in range(0, len(z), batch_size)]).mean())
