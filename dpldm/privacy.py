"""Differential privacy for fine-tuning: which parameters train, noise calibration, DP-SGD with
noise multiplicity, all through opacus' public API.

Noise multiplicity (DPDM, Dockhorn et al. 2022): the model sees B*K example-major rows; opacus
computes one gradient per row; ``KAveragedDPOptimizer`` averages the K rows of each example
*before* per-example norms and clipping. The sensitivity stays ``max_grad_norm``, so K costs no
privacy. With K = 1 it is exactly opacus' ``DPOptimizer``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer

from .config import FinetuneConfig
from .models import ConditionalUNet, attention_modules


class PrivacyConfigError(ValueError):
    """A fine-tuning setting that cannot run; raised before any private data is touched."""


# ----------------------------------------------------------------------------------------------
# Which parameters train


def select_trainable(model: ConditionalUNet, *, mode: str, layers: tuple[int, int], train_embedder: bool) -> list[str]:
    """Freeze everything, then unfreeze the selection; returns the selected parameter names.

    ``attention``: spatial-transformer blocks ``layers = (i, j)`` (1-based, forward order,
    inclusive) plus the class embedder if ``train_embedder``. ``full``: every parameter.
    ``none``: nothing (evaluate the pretrained model)."""
    mods = attention_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "none":
        return []
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    if mode != "attention":
        raise PrivacyConfigError(f"finetune.mode = {mode!r}; expected 'attention', 'full' or 'none'")
    i, j = layers
    if not (1 <= i <= j <= len(mods)):
        listing = "; ".join(f"{m.index}: {m.name} ({m.num_params:,} params)" for m in mods)
        raise PrivacyConfigError(
            f"finetune.layers = [{i}, {j}] is not a range of the model's {len(mods)} attention modules "
            f"(need 1 <= i <= j <= {len(mods)}). Available: {listing}")
    prefixes = [m.name + "." for m in mods[i - 1:j]]
    if train_embedder:
        prefixes.append("class_embedder.")
    names = []
    for name, p in model.named_parameters():
        if any(name.startswith(pre) for pre in prefixes):
            p.requires_grad_(True)
            names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# Accounting


ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


@dataclass(frozen=True)
class DPPlan:
    """What the run will spend, fixed before training: Poisson rate, steps and noise."""

    n: int  # private training examples
    sample_rate: float  # Poisson sampling probability q = 1 / steps_per_epoch
    steps_per_epoch: int
    epochs: int
    noise_multiplier: float
    target_epsilon: float
    delta: float
    accountant: str

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def validate_plan_inputs(cfg: FinetuneConfig, *, n: int) -> None:
    """The checks that need only N (the private set's size), before any private example is read."""
    if n < 1:
        raise PrivacyConfigError("the private training set is empty")
    if cfg.delta >= 1.0 / n:
        raise PrivacyConfigError(f"finetune.delta = {cfg.delta:g} must be < 1/N = {1.0 / n:.3g} (N = {n}); use e.g. 1e-5 or smaller")
    if cfg.batch_size > n:
        raise PrivacyConfigError(f"finetune.batch_size = {cfg.batch_size} is larger than the private set (N = {n})")


def plan_dp(cfg: FinetuneConfig, *, n: int) -> DPPlan:
    """Calibrate the noise multiplier so that ``cfg.epochs`` epochs spend at most ``cfg.epsilon``."""
    validate_plan_inputs(cfg, n=n)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    q = 1.0 / steps_per_epoch  # opacus' DPDataLoader uses 1 / len(loader)
    sigma = get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta, sample_rate=q,
                                 steps=steps_per_epoch * cfg.epochs, accountant=cfg.accountant, epsilon_tolerance=0.01)
    return DPPlan(n=n, sample_rate=q, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, noise_multiplier=float(sigma),
                  target_epsilon=cfg.epsilon, delta=cfg.delta, accountant=cfg.accountant)


def epsilon_of(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Independent computation of the epsilon of ``steps`` Poisson-subsampled Gaussian steps."""
    acc = ACCOUNTANTS[accountant]()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


# ----------------------------------------------------------------------------------------------
# DP-SGD with noise multiplicity


class KAveragedDPOptimizer(DPOptimizer):
    """opacus' DPOptimizer whose per-row gradients (B*K example-major rows) are averaged over each
    example's K rows before the per-example norm and clipping. ``expected_batch_size`` is B."""

    def __init__(self, *args, noise_multiplicity: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_multiplicity = noise_multiplicity

    def clip_and_accumulate(self):
        k = self.noise_multiplicity
        if k > 1:
            for p in self.params:
                g = self._get_flat_grad_sample(p)  # [B*K, *p.shape]
                if g.shape[0] % k:
                    raise RuntimeError(f"{g.shape[0]} rows are not a multiple of K = {k}")
                p.grad_sample = g.view(g.shape[0] // k, k, *p.shape).mean(1)  # [B, *p.shape], explicit B (may be 0)
        super().clip_and_accumulate()


@dataclass
class PrivateTraining:
    model: GradSampleModule
    optimizer: KAveragedDPOptimizer
    data_loader: DPDataLoader
    accountant: PRVAccountant | RDPAccountant


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    *,
    plan: DPPlan,
    max_grad_norm: float,
    noise_multiplicity: int,
    generator: torch.Generator,
    expected_batch_size: int,
    secure_mode: bool = False,
) -> PrivateTraining:
    """opacus' pieces, put together as PrivacyEngine.make_private does, with our optimizer class.
    Freeze parameters *before* calling this: hooks attach only to trainable modules."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_opt = KAveragedDPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=None,
        secure_mode=secure_mode,
        noise_multiplicity=noise_multiplicity,
    )
    loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
    accountant = ACCOUNTANTS[plan.accountant]()
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    return PrivateTraining(gsm, dp_opt, loader, accountant)
