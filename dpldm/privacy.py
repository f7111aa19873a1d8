"""Differential privacy for fine-tuning: which parameters train, noise calibration, DP-SGD with
noise multiplicity, all through opacus' public API.

Noise multiplicity (DPDM, Dockhorn et al. 2022): the model sees B*K example-major rows, and each
example's gradient is the mean over its K rows *before* per-example norms and clipping. The
sensitivity stays ``max_grad_norm``, so K costs no privacy. ``make_private`` forms that mean inside
opacus' per-sample-gradient hooks (``KFoldedGradSampleModule``: the K rows are folded into the
per-layer contraction, so no per-row gradient is stored); ``KAveragedDPOptimizer`` can also average
K per-row gradients itself, behind a plain ``GradSampleModule``. With K = 1 both are exactly opacus'.

Secret randomness: the DP noise and the Poisson sampling draw from generators seeded from the
operating system's secure source (``secret_generator``), never from params, logs or checkpoints.
Noise is added as opacus' ``secure_mode`` does (the sum of 4 Gaussian draws / 2, against
floating-point attacks). ``torch.Generator`` is a Mersenne Twister, not a cryptographic generator:
its 64-bit seed is secret, its stream is not cryptographically strong. opacus' full
``PrivacyEngine(secure_mode=True)`` needs ``torchcsprng``, which cannot be installed with our pins.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from opacus import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager

from .config import ConfigError, FinetuneConfig, LoraConfig
from .models import AttentionModule, ConditionalUNet, add_lora, attention_modules


class PrivacyConfigError(ConfigError):
    """A fine-tuning setting that cannot run; raised before any private data is touched."""


# ----------------------------------------------------------------------------------------------
# Which parameters train


@dataclass(frozen=True)
class Selection:
    """What ``select_trainable`` unfroze: the one description of the trainable set that the stage,
    the ledger, the audit and the benchmarks use."""

    mode: str
    names: tuple[str, ...]  # qualified parameter names, in ``named_parameters`` order
    params: tuple[nn.Parameter, ...]
    modules: tuple[AttentionModule, ...]  # the selected attention modules (all of them for ``full``)
    train_embedder: bool
    total_params: int

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def share(self) -> float:
        return self.trainable_params / self.total_params

    def describe(self) -> str:
        extra = " + class_embedder" if self.train_embedder else ""
        extra += " (LoRA adapters only)" if self.mode == "lora" else ""
        return (f"{len(self.names)} tensors, {self.trainable_params:,} of {self.total_params:,} parameters "
                f"({100 * self.share:.1f}%): {[m.name for m in self.modules]}{extra}")


def select_trainable(model: ConditionalUNet, *, mode: str, layers: tuple[int, int], train_embedder: bool,
                     lora: LoraConfig | None = None) -> Selection:
    """Freeze everything, then unfreeze the selection.

    ``attention``: spatial-transformer blocks ``layers = (i, j)`` (1-based, forward order,
    inclusive) plus the class embedder if ``train_embedder``. ``lora``: peft adapters (``lora``) added
    to those blocks, and only the adapters train (plus the class embedder if ``train_embedder``).
    ``full``: every parameter. ``none``: nothing (evaluate the pretrained model)."""
    mods = attention_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "none":
        chosen, prefixes = [], None
    elif mode == "full":
        chosen, prefixes = mods, [""]
    elif mode in ("attention", "lora"):
        i, j = layers
        if not (1 <= i <= j <= len(mods)):
            listing = "; ".join(f"{m.index}: {m.name} ({m.num_params:,} params)" for m in mods)
            raise PrivacyConfigError(
                f"finetune.layers = [{i}, {j}] is not a range of the model's {len(mods)} attention modules "
                f"(need 1 <= i <= j <= {len(mods)}). Available: {listing}")
        chosen = mods[i - 1:j]
        prefixes = [m.name + "." for m in chosen] + (["class_embedder."] if train_embedder else [])
        if mode == "lora":
            if lora is None:
                raise PrivacyConfigError("finetune.mode = 'lora' needs the finetune.lora section")
            add_lora(model, list(chosen), rank=lora.rank, alpha=lora.alpha, targets=lora.targets)
    else:
        raise PrivacyConfigError(f"finetune.mode = {mode!r}; expected 'attention', 'lora', 'full' or 'none'")
    names, params = [], []
    for name, p in model.named_parameters():
        adapter_ok = mode != "lora" or ".lora_" in name or name.startswith("class_embedder.")
        if prefixes is not None and adapter_ok and any(name.startswith(pre) for pre in prefixes):
            p.requires_grad_(True)
            names.append(name)
            params.append(p)
    return Selection(mode=mode, names=tuple(names), params=tuple(params), modules=tuple(chosen),
                     train_embedder=train_embedder and mode in ("attention", "lora"),
                     total_params=sum(p.numel() for p in model.parameters()))


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


def steps_per_epoch_of(n: int, batch_size: int) -> int:
    """Logical steps per epoch: ceil(N / B). The Poisson rate is q = 1 / steps_per_epoch (opacus' rule),
    and ``poisson_loader`` yields exactly this many batches (opacus' own loader yields int(1 / q),
    one fewer when 1 / q rounds down, e.g. N = 9300, B = 100)."""
    return math.ceil(n / batch_size)


def plan_dp(cfg: FinetuneConfig, *, n: int) -> DPPlan:
    """Calibrate the noise multiplier so that ``cfg.epochs`` epochs spend at most ``cfg.epsilon``."""
    validate_plan_inputs(cfg, n=n)
    steps_per_epoch = steps_per_epoch_of(n, cfg.batch_size)
    q = 1.0 / steps_per_epoch  # opacus' DPDataLoader uses 1 / len(loader)
    sigma = noise_multiplier_for(cfg.epsilon, delta=cfg.delta, sample_rate=q, steps=steps_per_epoch * cfg.epochs,
                                 accountant=cfg.accountant)
    return DPPlan(n=n, sample_rate=q, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, noise_multiplier=float(sigma),
                  target_epsilon=cfg.epsilon, delta=cfg.delta, accountant=cfg.accountant)


# The accountants are pure functions of a few numbers, and slow (opacus' PRV accountant bounds its domain with
# fractional-order RDP: about 15 s to calibrate the noise of a tiny run). Both are memoized per process, so a
# process that plans or accounts the same run twice (a retry, the per-epoch report, the tests) pays once.


@functools.lru_cache(maxsize=64)
def noise_multiplier_for(target_epsilon: float, *, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """opacus' calibration: the smallest noise multiplier (to tolerance 0.01 in epsilon) whose ``steps``
    Poisson-subsampled Gaussian steps spend at most ``target_epsilon``."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                      accountant=accountant, epsilon_tolerance=0.01))


@functools.lru_cache(maxsize=256)
def epsilon_of_history(history: tuple[tuple[float, float, int], ...], *, delta: float, accountant: str) -> float:
    """The epsilon of an accountant's ``history`` ((noise multiplier, sample rate, steps), ...)."""
    acc = ACCOUNTANTS[accountant]()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def accountant_epsilon(acc, *, delta: float, accountant: str) -> float:
    """``acc.get_epsilon(delta)`` for an opacus accountant, through the memo."""
    return epsilon_of_history(tuple((float(s), float(q), int(n)) for s, q, n in acc.history), delta=delta, accountant=accountant)


def epsilon_of(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Independent computation of the epsilon of ``steps`` Poisson-subsampled Gaussian steps."""
    return epsilon_of_history(((float(noise_multiplier), float(sample_rate), int(steps)),), delta=delta, accountant=accountant)


# ----------------------------------------------------------------------------------------------
# DP-SGD with noise multiplicity


# opacus per-sample samplers that take any dimensions between the batch and the feature ones, so an
# example's K rows can be folded into the contraction: nearly all trainable coordinates of an attention
# selection (Linear 90%, the rest LayerNorm, 1x1 Conv2d, GroupNorm, the class Embedding).
FOLDABLE = (nn.Linear, nn.LayerNorm, nn.Embedding)


def _folded(sampler: Callable, k: int) -> Callable:
    """``sampler`` on rows regrouped [B, K, ...]: one gradient per example, the sum over its K rows."""
    def fn(layer, activations, backprops):
        b = backprops.shape[0] // k
        return sampler(layer, [a.reshape(b, k, *a.shape[1:]) for a in activations], backprops.reshape(b, k, *backprops.shape[1:]))
    return fn


def _per_row_then_summed(sampler: Callable, k: int) -> Callable:
    """``sampler`` per row, then summed over each example's K rows."""
    def fn(layer, activations, backprops):
        return {p: g.reshape(g.shape[0] // k, k, *g.shape[1:]).sum(1) for p, g in sampler(layer, activations, backprops).items()}
    return fn


class KFoldedGradSampleModule(GradSampleModule):
    """opacus' GradSampleModule for B*K example-major rows (K draws of (t, noise) per example) that
    yields per-*example* gradients: the mean over each example's K rows, as the clipping needs them.
    With ``loss_reduction="mean"`` opacus scales the backprops by the batch length; taking it as B = rows / K
    makes each row's gradient 1/K of its own, so the sum over K rows is the mean. Linear, LayerNorm and
    Embedding fold the K rows into their contraction (no per-row gradient is ever stored: about 2x less
    memory traffic in the hooks and the clipping at K = 2); other trainable layers are computed per row
    and summed. K = 1 is opacus' module unchanged."""

    def __init__(self, m: nn.Module, *, k: int, **kwargs):
        super().__init__(m, **kwargs)
        self.k = k
        if k > 1:
            samplers = {}
            for module in m.modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    t = type(module)
                    base = GradSampleModule.GRAD_SAMPLERS.get(t, ft_compute_per_sample_gradient)
                    samplers[t] = _folded(base, k) if t in FOLDABLE else _per_row_then_summed(base, k)
            self.GRAD_SAMPLERS = samplers  # instance attribute: opacus looks samplers up through self

    def rearrange_grad_samples(self, *, module: nn.Module, backprops: torch.Tensor, loss_reduction: str, batch_first: bool):
        if self.k > 1 and not hasattr(module, "max_batch_len"):
            rows = max(a[-1].shape[0] for a in module.activations)
            if rows % self.k:
                raise RuntimeError(f"{rows} rows are not a multiple of K = {self.k}: rows must be example-major, K per example")
            module.max_batch_len = rows // self.k  # B: the mean-loss scaling and the per-example buffers
        return super().rearrange_grad_samples(module=module, backprops=backprops, loss_reduction=loss_reduction,
                                              batch_first=batch_first)


class KAveragedDPOptimizer(DPOptimizer):
    """opacus' DPOptimizer whose per-row gradients (B*K example-major rows) are averaged over each
    example's K rows before the per-example norm and clipping. ``expected_batch_size`` is B. Behind a
    ``KFoldedGradSampleModule`` the gradients are already per example: give it ``noise_multiplicity=1``."""

    def __init__(self, *args, noise_multiplicity: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_multiplicity = noise_multiplicity
        self.folded = 1  # rows per example averaged upstream, by the KFoldedGradSampleModule (set by make_private)
        self.canaries = None  # dpldm.audit.GradientCanaries, set only by the privacy audit

    def clip_and_accumulate(self):
        if self.canaries is not None and not self._check_skip_next_step(pop_next=False):
            self.canaries.inject(self)  # row level, before the K rows are regrouped (audit only)
        k = self.noise_multiplicity
        if k > 1:
            for p in self.params:
                g = self._get_flat_grad_sample(p)  # [B*K, *p.shape]
                if g.shape[0] % k:
                    raise RuntimeError(f"{g.shape[0]} rows are not a multiple of K = {k}")
                p.grad_sample = g.view(g.shape[0] // k, k, *p.shape).mean(1)  # [B, *p.shape], explicit B (may be 0)
        super().clip_and_accumulate()

    def add_noise(self):
        super().add_noise()
        if self.canaries is not None:
            self.canaries.observe(self)  # the white-box auditor reads the noisy summed gradient


class AdamBC(torch.optim.Optimizer):
    """DP-AdamBC (Tang et al., AAAI 2024): Adam whose second moment loses the known variance of the DP
    noise. Behind DP-SGD every coordinate of the averaged gradient carries Gaussian noise of variance
    ``noise_var`` = (sigma C / B)^2, which dominates Adam's second moment, so plain DP-Adam divides
    every coordinate by about the same number and acts as SGD. Here the bias-corrected second moment
    is ``max(v_hat - noise_var, floor * noise_var)``; the rest is torch's Adam without weight decay.
    ``noise_var = 0`` is plain Adam (with the second moment floored at 0)."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], noise_var: float, floor: float, eps: float = 1e-8):
        if noise_var < 0 or floor <= 0:
            raise ValueError(f"AdamBC needs noise_var >= 0 and floor > 0, got {noise_var} and {floor}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, noise_var=noise_var, floor=floor))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (b1, b2), phi, lr = group["betas"], group["noise_var"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** t)).sub_(phi).clamp_(min=group["floor"] * phi).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        return loss


def dp_noise_variance(plan: DPPlan, *, clip_norm: float) -> float:
    """The variance of the DP noise in each coordinate of the averaged gradient the optimizer receives:
    (sigma C / B)^2 with B the expected batch size (opacus' ``loss_reduction="mean"``)."""
    return (plan.noise_multiplier * clip_norm / expected_batch_size(plan)) ** 2


def expected_batch_size(plan: DPPlan) -> int:
    return max(1, round(plan.n * plan.sample_rate))


# ----------------------------------------------------------------------------------------------
# Randomness and the loader


def secret_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with 64 bits from ``os.urandom``: nobody, params or logs included,
    knows its seed. Never store its state."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return g


def dp_generators(*, reproducible: bool, seed: int, device: str | torch.device = "cpu") -> tuple[torch.Generator, torch.Generator]:
    """(Poisson sampling, DP noise) generators: secret by default; seeded from ``seed`` only for a run that
    is explicitly not a DP release (``finetune.reproducible_noise``)."""
    if reproducible:
        return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 2)
    return secret_generator(), secret_generator(device)


def poisson_loader(dataset: torch.utils.data.Dataset, *, plan: DPPlan, generator: torch.Generator) -> DPDataLoader:
    """opacus' Poisson-sampling loader at the plan's rate, yielding exactly ``plan.steps_per_epoch``
    batches per epoch, so the steps taken equal the steps the noise was calibrated for."""
    loader = DPDataLoader(dataset, sample_rate=plan.sample_rate, generator=generator)
    loader.batch_sampler.steps = plan.steps_per_epoch  # opacus would use int(1 / q), which can round down
    return loader


@dataclass
class PrivateTraining:
    model: GradSampleModule
    optimizer: KAveragedDPOptimizer
    data_loader: DPDataLoader
    accountant: PRVAccountant | RDPAccountant


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: torch.utils.data.Dataset,
    *,
    plan: DPPlan,
    max_grad_norm: float,
    noise_multiplicity: int,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
    secure_mode: bool = True,
    optimizer_cls: type[KAveragedDPOptimizer] = KAveragedDPOptimizer,
    fold_in_hooks: bool = True,
) -> PrivateTraining:
    """opacus' pieces, put together as PrivacyEngine.make_private does, with our optimizer class and
    loader. Freeze parameters *before* calling this: hooks attach only to trainable modules. Pass
    ``secret_generator()``s unless the run is explicitly not a DP release. The K-average is formed in
    the hooks (``KFoldedGradSampleModule``), so the optimizer sees one gradient per example;
    ``fold_in_hooks=False``: opacus' plain module and the optimizer averages K per-row gradients (the
    same mechanism, slower: ``benchmarks/dp_step.py --ab fold``)."""
    k_hooks = noise_multiplicity if fold_in_hooks else 1
    gsm = KFoldedGradSampleModule(model, k=k_hooks, batch_first=True, loss_reduction="mean")
    dp_opt = optimizer_cls(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size(plan),
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=secure_mode,
        noise_multiplicity=noise_multiplicity // k_hooks,  # rows per example it still has to average
    )
    dp_opt.folded = gsm.k
    loader = poisson_loader(dataset, plan=plan, generator=sampling_generator)
    accountant = ACCOUNTANTS[plan.accountant]()
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    return PrivateTraining(gsm, dp_opt, loader, accountant)


# ----------------------------------------------------------------------------------------------
# The training loop of one epoch (DP or not)


def train_epoch(
    *,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    trainable: Sequence[nn.Parameter],
    loss_fn: Callable[..., torch.Tensor],
    private: bool,
    physical_batch_size: int,
    on_step: Callable[[], None] = lambda: None,
) -> list[float]:
    """One pass over ``loader``; returns the per-batch losses. With ``private``, logical batches are
    split into physical ones (opacus' BatchMemoryManager) and ``on_step`` runs only on real optimizer
    steps; an empty Poisson batch still takes a (noise-only) step."""
    losses: list[float] = []
    ctx = BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical_batch_size, optimizer=optimizer) \
        if private else contextlib.nullcontext(loader)
    with ctx as batches:
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            if private and len(batch[-1]) == 0:
                for p in trainable:
                    p.grad_sample = torch.zeros(0, *p.shape, device=p.device)
            else:
                loss = loss_fn(*batch)
                loss.backward()
                losses.append(loss.detach().item())
            optimizer.step()
            if not private or not optimizer._is_last_step_skipped:
                on_step()
    return losses
