"""Diffusion math as small functions over diffusers' schedulers (Ho et al. 2020; DDIM, Song et al. 2021).

- ``make_scheduler``: the forward process (T, beta schedule). ``scaled_linear`` from 0.0015 to
  0.0155 is the official LDM schedule (linear in sqrt(beta)).
- ``expand_rows``: noise multiplicity (DPDM): K copies of each example, example-major.
- ``eps_loss``: L_simple = || eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, y) ||^2, optionally
  weighted by Min-SNR-gamma (Hang et al. 2023): min(SNR(t), gamma) / SNR(t), diffusers' ``compute_snr``;
  ``draw_timesteps``: t uniform per row, or stratified over each example's K rows.
- ``Sampler``: the sampler's settings (params' sample section) as one validated value;
  ``sample_latents``: the sampling loop (DDIM, or DPM-Solver++ 2M deterministic or stochastic; Lu et al. 2022),
  with optional classifier-free guidance.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, get_args

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from .config import LDMConfig, SamplePrecision, SampleSolver, SampleSpacing


def make_scheduler(cfg: LDMConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
    )


def expand_rows(*tensors: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """K copies of every example, example-major: rows [x0, x0, ..., x1, x1, ...].
    (``repeat`` would tile the batch and mix examples when the K rows are regrouped.)"""
    return tuple(t.repeat_interleave(k, dim=0) for t in tensors)


def q_sample(scheduler: DDPMScheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps."""
    return scheduler.add_noise(z0, noise, t)


def draw_timesteps(b: int, k: int, *, num_train_timesteps: int, generator: torch.Generator | None = None,
                   stratified: bool = False, t_range: tuple[int, int] | None = None) -> torch.Tensor:
    """Timesteps for B*K example-major rows, on the CPU. Uniform: each row's t uniform on {0, ..., T-1},
    independently. Stratified: example i's K rows take t_ij = floor((j + u_ij) T / K), j = 0..K-1, u_ij
    uniform on [0, 1) and independent: one t in each of K equal strata, uniform within it. The mean over an
    example's K rows then estimates the mean over t without bias and with less variance (stratified
    sampling: for a loss linear in t, 1/K^2 of the uniform draws' variance). With K = 1 both are uniform,
    through different draws. ``t_range`` = (lo, hi): the same over {lo, ..., hi - 1} instead of [0, T) (data-independent;
    the default is all of [0, T))."""
    lo, hi = t_range if t_range is not None else (0, num_train_timesteps)
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ValueError(f"t_range {[lo, hi]} must satisfy 0 <= lo < hi <= T = {num_train_timesteps}")
    if not stratified:
        return torch.randint(lo, hi, (b * k,), generator=generator, device="cpu")
    u = torch.rand(b, k, generator=generator, device="cpu", dtype=torch.float64)
    strata = torch.arange(k, dtype=torch.float64).view(1, k)
    return (lo + ((strata + u) * ((hi - lo) / k)).floor().long()).clamp_(max=hi - 1).flatten()


def eps_loss(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    y: torch.Tensor,
    *,
    scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
    k: int = 1,
    snr_gamma: float = 0.0,
    stratified: bool = False,
    t_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-example epsilon-prediction loss [B], each averaged over K (t, eps) draws.

    ``snr_gamma`` > 0 weights each row by min(SNR(t), gamma) / SNR(t) (Min-SNR-gamma for epsilon
    prediction): the low-noise steps, which only polish detail, count less. The weight is per row,
    before the mean over K. ``stratified``: each example's K timesteps come one from each of K equal strata
    of [0, T) (``draw_timesteps``); ``t_range`` = (lo, hi) draws them from [lo, hi) instead. The model sees B*K
    example-major rows. ``loss.mean()`` over the result equals the mean over all rows, which is what opacus expects
    (loss_reduction="mean")."""
    b = z0.shape[0]
    z0, y = expand_rows(z0, y, k=k)  # [B*K, ...]
    t = draw_timesteps(b, k, num_train_timesteps=scheduler.config.num_train_timesteps, generator=generator,
                       stratified=stratified, t_range=t_range).to(z0.device)
    noise = torch.randn(z0.shape, generator=generator, device="cpu").to(z0.device)
    pred = model(q_sample(scheduler, z0, noise, t), t, y)
    per_row = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)  # [B*K]
    if snr_gamma > 0:
        from diffusers.training_utils import compute_snr  # here: the module costs about 1.6 s to import

        snr = compute_snr(scheduler, t)
        per_row = per_row * (snr.clamp(max=snr_gamma) / snr)
    return per_row.view(b, k).mean(1)  # [B]


PRECISIONS = get_args(SamplePrecision)
SOLVERS = get_args(SampleSolver)
SPACINGS = get_args(SampleSpacing)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, or a CPU whose oneDNN may use bf16
    (not capped below AVX-512, e.g. by ``ONEDNN_MAX_CPU_ISA``) and that has the AVX512-BF16 or AMX instructions.
    Elsewhere oneDNN emulates bf16, 8-30x slower than fp32 (an AVX2 cap, measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    except (AttributeError, RuntimeError):  # a build without these probes: assume emulation
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``sample.precision`` or ``ae.precision`` as it runs on ``device``: "auto" is "bf16" where ``native_bf16``, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@dataclass(frozen=True)
class Sampler:
    """How latents are drawn: ``steps`` steps of ``solver`` placed on [0, T) by ``spacing`` (diffusers'
    ``timestep_spacing``), ``eta`` (DDIM's only), classifier-free guidance ``guidance_scale`` (0 = off) and the
    network's ``precision`` ("auto": ``resolve_precision``). The sample section's keys of the same names
    (``Sampler.of``); an unknown solver, spacing or precision is refused by name."""
    steps: int
    eta: float
    guidance_scale: float = 0.0
    precision: str = "fp32"
    solver: str = "ddim"
    spacing: str = "leading"

    def __post_init__(self):
        for name, allowed in (("solver", SOLVERS), ("spacing", SPACINGS), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}; expected one of {allowed}")

    @classmethod
    def of(cls, cfg) -> Sampler:
        """The sampler keys of a ``dpldm.config.SampleConfig`` (or any object with those attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def on(self, device: torch.device | str) -> Sampler:
        """This sampler with its precision as it runs on ``device`` ("auto" resolved)."""
        return replace(self, precision=resolve_precision(self.precision, device))


def reverse_scheduler(scheduler: DDPMScheduler, sampler: Sampler):
    """The sampler's scheduler over the training schedule's betas, set to ``sampler.steps`` steps placed by
    ``sampler.spacing``."""
    if sampler.solver == "ddim":
        out = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True, clip_sample=False,
                                        timestep_spacing=sampler.spacing)
    else:  # dpmpp_2m | dpmpp_2m_sde (Sampler validated the name)
        out = DPMSolverMultistepScheduler.from_config(
            scheduler.config, solver_order=2,
            algorithm_type="sde-dpmsolver++" if sampler.solver == "dpmpp_2m_sde" else "dpmsolver++",
            timestep_spacing=sampler.spacing)
    out.set_timesteps(sampler.steps)
    return out


@torch.no_grad()
def sample_latents(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    *,
    shape: tuple[int, ...],
    scheduler: DDPMScheduler,
    sampler: Sampler,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """From pure noise to z0 for labels ``y`` as ``sampler`` says. With ``sampler.guidance_scale`` w > 0:
    eps = (1 + w) eps(z, y) - w eps(z, null). Precision "bf16" runs the network under bf16 autocast; the scheduler's
    arithmetic and the latents stay fp32."""
    precision = resolve_precision(sampler.precision, device)
    rev = reverse_scheduler(scheduler, sampler)
    step_kwargs = {"eta": sampler.eta} if sampler.solver == "ddim" else {}
    guidance_scale = sampler.guidance_scale
    y = y.to(device)
    z = torch.randn((len(y), *shape), generator=generator, device="cpu").to(device)
    guided = guidance_scale > 0
    if guided and null_class is None:
        raise ValueError("guidance_scale > 0 needs null_class")
    labels = torch.cat([y, torch.full_like(y, null_class)]) if guided else y  # guided: conditional rows, then null rows
    device_type = torch.device(device).type
    for t in rev.timesteps:
        zz = torch.cat([z, z]) if guided else z
        tt = torch.full((len(labels),), int(t), device=device, dtype=torch.long)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(zz, tt, labels).float()
        if guided:
            cond, uncond = out.chunk(2)
            eps = (1 + guidance_scale) * cond - guidance_scale * uncond
        else:
            eps = out
        z = rev.step(eps, t, z, generator=generator, **step_kwargs).prev_sample
    return z
