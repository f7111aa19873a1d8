"""DP fine-tuning of a pretrained LDM as one object that the stage, the audit and the benchmarks share.

Order matters for privacy: ``plan_finetune`` selects the trainable parameters and calibrates the
noise from N alone, before a single private latent is read. ``Finetuning`` then wires opacus
(``dpldm.privacy.make_private``), runs epochs, keeps the EMA of the trainable parameters and gives
its resumable state. No file I/O: the stage saves ``state_dict()`` and the ledger.

The (t, noise) draws of the diffusion loss are part of the per-example gradient, not of the DP
mechanism: they are seeded. The DP noise and the Poisson sampling are secret unless
``finetune.reproducible_noise`` (then nothing made from the run is a DP release); the secret
generators' states are never in ``state_dict()``, so a resumed run draws fresh secret noise.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.utils.data import DataLoader, TensorDataset

from .config import FinetuneConfig, LDMConfig, check, to_dict
from .diffusion import eps_loss, make_scheduler
from .ledger import SEEDED_NOISE, SECRET_NOISE, Ledger, release_of
from .models import ConditionalUNet, merge_lora
from .privacy import (AdamBC, DPPlan, Selection, accountant_epsilon, dp_generators, dp_noise_variance, make_private, plan_dp,
                      select_trainable, steps_per_epoch_of, train_epoch, validate_plan_inputs)
from .training import make_ema


def plan_finetune(model: ConditionalUNet, cfg: FinetuneConfig, *, n: int) -> tuple[Selection, DPPlan | None]:
    """Everything that must be settled before private data is read: the trainable selection and the
    DP plan (noise calibrated from N alone). ``None`` plan: no DP (non-private, or ``mode: none``).
    Raises ``PrivacyConfigError`` naming the bad key."""
    selection = select_trainable(model, mode=cfg.mode, layers=cfg.layers, train_embedder=cfg.train_embedder, lora=cfg.lora)
    if cfg.private and cfg.mode != "none":
        return selection, plan_dp(cfg, n=n)
    validate_plan_inputs(cfg, n=n)
    return selection, None


def new_ledger(cfg: FinetuneConfig, selection: Selection, plan: DPPlan | None, *, n: int) -> Ledger:
    """The ledger's fields fixed before training."""
    private = plan is not None
    return Ledger(
        **release_of(cfg), private=private,
        noise_source=(SEEDED_NOISE if cfg.reproducible_noise else SECRET_NOISE) if private else None,
        mode=cfg.mode, layers=list(cfg.layers), train_embedder=cfg.train_embedder,
        selected_attention_modules=[m.name for m in selection.modules],
        trainable_params=selection.trainable_params, total_params=selection.total_params, trainable_share=selection.share,
        N=n, K=cfg.noise_multiplicity, expected_batch_size=cfg.batch_size, physical_batch_size=cfg.physical_batch_size,
        epochs=cfg.epochs if cfg.mode != "none" else 0, clip_norm=cfg.clip_norm, accountant=cfg.accountant,
        delta=cfg.delta, target_epsilon=cfg.epsilon if private else None,
        noise_multiplier=plan.noise_multiplier if plan else 0.0,
        sample_rate=plan.sample_rate if plan else 1.0 / steps_per_epoch_of(n, cfg.batch_size),
        lora=to_dict(cfg.lora) if cfg.mode == "lora" else None,
        adapter_params=[name for name in selection.names if ".lora_" in name],
    )


def make_optimizer(params: list[torch.nn.Parameter], cfg: FinetuneConfig, plan: DPPlan | None) -> torch.optim.Optimizer:
    """AdamW without weight decay; DP-AdamBC (``finetune.adam_bc_floor > 0``) under DP, where the noise's variance is known."""
    betas = (cfg.adam_beta1, 0.999)
    if plan is not None and cfg.adam_bc_floor > 0:
        return AdamBC(params, lr=cfg.lr, betas=betas, noise_var=dp_noise_variance(plan, clip_norm=cfg.clip_norm), floor=cfg.adam_bc_floor)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=0.0)


class Finetuning:
    """Fine-tuning of ``selection`` on (z, y): DP-SGD with K-averaging when ``plan`` is given, plain
    AdamW otherwise. ``epochs`` defaults to the plan's (or ``cfg.epochs``; 0 for ``mode: none``)."""

    def __init__(self, model: ConditionalUNet, selection: Selection, plan: DPPlan | None, cfg: FinetuneConfig,
                 ldm_cfg: LDMConfig, *, z: torch.Tensor, y: torch.Tensor, seed: int, device: torch.device | str = "cpu"):
        self.model, self.selection, self.plan, self.cfg = model, selection, plan, cfg
        self.device = device
        self.scheduler = make_scheduler(ldm_cfg)
        check(cfg.t_range[1] <= ldm_cfg.num_train_timesteps, "finetune.t_range", list(cfg.t_range),
              f"[lo, hi] with hi <= ldm.num_train_timesteps ({ldm_cfg.num_train_timesteps})")
        model.to(device)
        params = list(selection.params)
        self.ema = make_ema(params, cfg.ema_decay)  # before opacus wraps the model (no hooks on the copy)
        opt = make_optimizer(params, cfg, plan) if params else None
        self.g_loss = torch.Generator().manual_seed(seed + 1)
        # without DP the sampling generator only shuffles: seeded
        self.g_data, self.g_dp = dp_generators(reproducible=cfg.reproducible_noise or plan is None, seed=seed, device=device)
        self.accountant = None
        dataset = TensorDataset(z, y)
        if plan is not None:
            pt = make_private(model, opt, dataset, plan=plan, max_grad_norm=cfg.clip_norm, noise_multiplicity=cfg.noise_multiplicity,
                              sampling_generator=self.g_data, noise_generator=self.g_dp)
            self.net, self.optimizer, self.loader, self.accountant = pt.model, pt.optimizer, pt.data_loader, pt.accountant
            self.steps_per_epoch, self.epochs = plan.steps_per_epoch, plan.epochs
        else:
            self.net, self.optimizer = model, opt
            self.loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=self.g_data)
            self.steps_per_epoch = steps_per_epoch_of(len(dataset), cfg.batch_size)
            self.epochs = cfg.epochs if cfg.mode != "none" else 0
        self.epoch, self.steps = 0, 0
        # the lr schedule depends on the step index only (the plan's logical steps), never on the data
        self.lr_sched = (get_cosine_schedule_with_warmup(self.optimizer, num_warmup_steps=0, num_training_steps=self.total_steps)
                         if cfg.cosine_decay and self.optimizer is not None else None)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def loss(self, zb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return eps_loss(self.net, zb.to(self.device), yb.to(self.device), scheduler=self.scheduler, generator=self.g_loss,
                        k=self.cfg.noise_multiplicity, stratified=self.cfg.stratified_t, t_range=self.cfg.t_range).mean()

    def run_epoch(self, on_step: Callable[[], None] = lambda: None) -> list[float]:
        """One epoch; ``on_step`` after every logical (optimizer) step. Returns the per-batch losses."""
        self.net.train()

        def step():
            self.ema.step(self.selection.params)
            if self.lr_sched is not None:
                self.lr_sched.step()
            self.steps += 1
            on_step()

        losses = train_epoch(loader=self.loader, optimizer=self.optimizer, trainable=self.selection.params,
                             private=self.plan is not None, physical_batch_size=self.cfg.physical_batch_size, on_step=step,
                             loss_fn=self.loss)
        self.epoch += 1
        return losses

    def epsilon(self) -> float | None:
        """The accountant's epsilon so far (``None`` without DP)."""
        if self.accountant is None:
            return None
        return accountant_epsilon(self.accountant, delta=self.cfg.delta, accountant=self.cfg.accountant)

    def finish(self) -> dict | None:
        """Put the EMA weights into the model (the released parameters). LoRA adapters are then folded
        into the base weights (the model has the plain architecture again); their own weights are
        returned for an adapter-only release (``None`` in the other modes)."""
        if self.selection.params:
            self.ema.copy_to(self.selection.params)
        self.model.eval()
        return merge_lora(self.model) if self.selection.mode == "lora" else None

    def state_dict(self) -> dict:
        """Everything a resumed run needs. The DP generators' states only when seeded: secret ones are
        never written anywhere."""
        seeded = self.cfg.reproducible_noise
        return {"epoch": self.epoch, "steps": self.steps, "model": self.model.state_dict(),
                "opt": self.optimizer.state_dict() if self.optimizer is not None else None, "ema": self.ema.state_dict(),
                "lr_sched": self.lr_sched.state_dict() if self.lr_sched is not None else None,
                "accountant": self.accountant.state_dict() if self.accountant is not None else None,
                "g_loss": self.g_loss.get_state(), "g_data": self.g_data.get_state() if seeded else None,
                "g_dp": self.g_dp.get_state() if seeded else None, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])
        if self.lr_sched is not None:
            self.lr_sched.load_state_dict(state["lr_sched"])
        if self.accountant is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.g_loss.set_state(state["g_loss"])
        if state.get("g_data") is not None:  # only seeded runs store them; secret ones draw fresh secret seeds
            self.g_data.set_state(state["g_data"])
            self.g_dp.set_state(state["g_dp"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.steps = state["epoch"], state["steps"]
