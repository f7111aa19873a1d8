"""Typed, strictly loaded parameters: one frozen dataclass per params.yaml section.

Every error names the key (``finetune.epsilon``), the value it got and what is allowed. DVC's
``dvc exp run -S x=1e-06`` writes a value that YAML reads as a *string*; numeric fields accept such
strings only when they parse as numbers, anything else is an error.

params.yaml is the one source of default values: the dataclasses have none, and a key missing from
params.yaml is an error that names it. So every key is written out there, and
``dvc exp run -S section.key=value`` works for each of them.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping


class UserError(Exception):
    """An expected mistake of the user's (a bad param, a missing or unreadable data file, a bad folder
    layout). Stages print its one-line message, which names the key or file and the fix, and exit 2
    with no traceback."""


class ConfigError(UserError, ValueError):
    """A bad params.yaml value; the message names the key, the value and what is allowed."""


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    value = list(value) if isinstance(value, tuple) else value  # as written in params.yaml
    raise ConfigError(f"params: {key} = {value!r} is not allowed; expected {allowed}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(key, value, f"a list of {args[0].__name__}")
        if args[-1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(key, value, f"a list of {len(args)} values")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=False)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(key, value, "a mapping")
        return from_mapping(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            _fail(key, value, "an integer")
        try:
            return int(value)
        except ValueError:
            _fail(key, value, "an integer")
    if tp is float:
        if isinstance(value, bool):
            _fail(key, value, "a number")
        try:
            out = float(value)  # accepts DVC's "1e-06" strings
        except (TypeError, ValueError):
            _fail(key, value, "a number")
        if not math.isfinite(out):
            _fail(key, value, "a finite number")
        return out
    if tp is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    raise TypeError(f"unsupported field type {tp!r} for {key}")


def from_mapping(cls: type, data: Mapping[str, Any] | None, *, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys, bad types and bad values raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        _fail(f"{prefix}.{unknown[0]}", data[unknown[0]], "no such key; known keys: " + ", ".join(sorted(names)))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
    if missing:
        raise ConfigError(f"params: {prefix}.{missing[0]} is missing; every key is written out in params.yaml "
                          f"(missing here: {', '.join(missing)}). Copy it from the repository's params.yaml.")
    kwargs = {f.name: _coerce(f"{prefix}.{f.name}", data[f.name], hints[f.name]) for f in dataclasses.fields(cls)}
    return cls(**kwargs)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(key, value, allowed)


# ----------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class Seeds:
    prepare_public: int
    prepare_private: int
    pretrain_ae: int
    pretrain_ldm: int
    dp_finetune: int
    sample: int
    reference: int
    score_classifier: int


@dataclass(frozen=True)
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"]
    threads: int  # torch intra-op threads on CPU; 0 = torch's default
    seeds: Seeds

    def __post_init__(self):
        check(self.threads >= 0, "runtime.threads", self.threads, "an integer >= 0")


SOURCES = ("fontdigits", "mnist5k", "digits8x8", "MNIST", "FashionMNIST", "EMNIST", "SVHN", "CIFAR10", "CelebA", "imagefolder")


@dataclass(frozen=True)
class DatasetConfig:
    """One image set. ``n_train``/``n_test`` cap the splits (0 = all available)."""

    source: Literal[SOURCES]  # type: ignore[valid-type]
    root: str  # local folder for torchvision sets and imagefolder
    download: bool  # torchvision sets only; off by default (no network at run time)
    count: int  # fontdigits: images to render
    n_train: int
    n_test: int
    test_fraction: float  # sources without an official test split
    image_size: int  # pixels; MNIST-family 28 -> 32 by zero padding
    channels: Literal[1, 3]
    emnist_split: str
    preview_grid: bool  # write a grid of example images; off for private data unless asked (it shows real records)
    font_stroke: tuple[int, int]  # fontdigits: stroke width drawn uniformly from [lo, hi] px (on the 64-px canvas)
    font_elastic_alpha: tuple[float, float]  # fontdigits: elastic distortion size drawn uniformly from [lo, hi)

    def validate(self, key: str) -> None:
        lo, hi = self.font_stroke
        check(0 <= lo <= hi <= 8, f"{key}.font_stroke", list(self.font_stroke), "[lo, hi] px with 0 <= lo <= hi <= 8")
        lo, hi = self.font_elastic_alpha
        check(0 <= lo <= hi <= 100, f"{key}.font_elastic_alpha", list(self.font_elastic_alpha),
              "[lo, hi] with 0 <= lo <= hi <= 100")
        check(self.count > 0, f"{key}.count", self.count, "an integer > 0")
        check(self.n_train >= 0, f"{key}.n_train", self.n_train, "an integer >= 0")
        check(self.n_test >= 0, f"{key}.n_test", self.n_test, "an integer >= 0")
        check(0.0 < self.test_fraction < 1.0, f"{key}.test_fraction", self.test_fraction, "a number in (0, 1)")
        check(8 <= self.image_size <= 512, f"{key}.image_size", self.image_size, "pixels in [8, 512]")
        check(self.source in ("fontdigits", "mnist5k", "digits8x8") or bool(self.root), f"{key}.root", self.root,
              f"a local folder holding the {self.source} files (source {self.source!r} reads from disk)")


@dataclass(frozen=True)
class DataConfig:
    public: DatasetConfig
    private: DatasetConfig

    def __post_init__(self):
        self.public.validate("data.public")
        self.private.validate("data.private")


# fp32, bf16 autocast, or auto = bf16 where the device computes it natively (dpldm.diffusion.resolve_precision), else fp32
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class AEConfig:
    """diffusers AutoencoderKL; downsampling factor f = 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: tuple[int, ...]
    latent_channels: int
    layers_per_block: int
    norm_num_groups: int
    epochs: int
    batch_size: int
    lr: float
    kl_weight: float
    recon_loss: Literal["l1", "l2"]
    precision: Precision  # the training forward under bf16 autocast ("auto": where the device computes bf16 natively)

    def __post_init__(self):
        check(1 <= len(self.block_out_channels) <= 5, "ae.block_out_channels", self.block_out_channels, "1 to 5 channel counts")
        check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "ae.block_out_channels",
              self.block_out_channels, f"multiples of ae.norm_num_groups={self.norm_num_groups} (GroupNorm)")
        check(self.latent_channels >= 1, "ae.latent_channels", self.latent_channels, "an integer >= 1")
        check(self.epochs >= 1, "ae.epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, "ae.batch_size", self.batch_size, "an integer >= 1")
        check(self.lr > 0, "ae.lr", self.lr, "a number > 0")
        check(self.kl_weight >= 0, "ae.kl_weight", self.kl_weight, "a number >= 0")


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int

    def __post_init__(self):
        check(self.batch_size >= 1, "encode.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class LDMConfig:
    """Class-conditional diffusers UNet2DConditionModel on the AE latents."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int  # diffusers' name for the number of attention heads (head width = channels / this)
    cross_attention_dim: int
    ff_mult: int  # the attention modules' feed-forward (GEGLU) width in multiples of their channels (diffusers: 4)
    norm_num_groups: int
    attention_levels: tuple[int, ...]  # resolution levels with cross-attention; () = all
    num_classes: int
    class_time_embedding: bool  # the class embedder also adds a vector to the time embedding (every ResNet block)
    num_train_timesteps: int
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"]
    beta_start: float
    beta_end: float
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    cosine_decay: bool
    ema_decay: float
    label_dropout: float  # for classifier-free guidance: share of labels replaced by the null class
    snr_gamma: float  # Min-SNR-gamma loss weighting in pretraining (0 = off: the plain eps loss)
    checkpoint_every: int  # steps
    pretrained_path: str  # a diffusers-format UNet folder to use instead of pretraining

    def __post_init__(self):
        check(len(self.block_out_channels) >= 1, "ldm.block_out_channels", self.block_out_channels, "at least one channel count")
        check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "ldm.block_out_channels",
              self.block_out_channels, f"multiples of ldm.norm_num_groups={self.norm_num_groups}")
        check(self.attention_head_dim >= 1 and all(c % self.attention_head_dim == 0 for c in self.block_out_channels),
              "ldm.attention_head_dim", self.attention_head_dim,
              f"a number of heads >= 1 that divides every entry of ldm.block_out_channels={list(self.block_out_channels)}")
        check(self.ff_mult >= 1, "ldm.ff_mult", self.ff_mult, "an integer >= 1 (diffusers' transformer blocks use 4)")
        check(self.num_classes >= 1, "ldm.num_classes", self.num_classes, "an integer >= 1")
        check(self.num_train_timesteps >= 2, "ldm.num_train_timesteps", self.num_train_timesteps, "an integer >= 2")
        check(0 < self.beta_start < self.beta_end < 1, "ldm.beta_end", self.beta_end, "0 < beta_start < beta_end < 1")
        check(self.steps >= 0, "ldm.steps", self.steps, "an integer >= 0 (0 only with ldm.pretrained_path)")
        check(self.batch_size >= 1, "ldm.batch_size", self.batch_size, "an integer >= 1")
        check(self.lr > 0, "ldm.lr", self.lr, "a number > 0")
        check(self.warmup_steps >= 0, "ldm.warmup_steps", self.warmup_steps, "an integer >= 0")
        check(0 <= self.ema_decay < 1, "ldm.ema_decay", self.ema_decay, "a number in [0, 1)")
        check(0 <= self.label_dropout < 1, "ldm.label_dropout", self.label_dropout, "a number in [0, 1)")
        check(self.snr_gamma >= 0, "ldm.snr_gamma", self.snr_gamma, "a number >= 0 (0 = off)")
        check(self.checkpoint_every >= 1, "ldm.checkpoint_every", self.checkpoint_every, "an integer >= 1")


LoraTarget = Literal["to_q", "to_k", "to_v", "to_out", "ff", "proj_in", "proj_out"]


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (peft) in the attention modules ``finetune.layers`` (``finetune.mode: lora``)."""

    rank: int
    alpha: float  # peft's lora_alpha: the update is scaled by alpha / rank
    targets: tuple[LoraTarget, ...]  # attention projections, optionally the feed-forward and proj_in/proj_out

    def __post_init__(self):
        check(self.rank >= 1, "finetune.lora.rank", self.rank, "an integer >= 1")
        check(self.alpha > 0, "finetune.lora.alpha", self.alpha, "a number > 0")
        check(len(self.targets) >= 1 and len(set(self.targets)) == len(self.targets), "finetune.lora.targets",
              self.targets, "a non-empty list without repeats of to_q, to_k, to_v, to_out, ff, proj_in, proj_out")


@dataclass(frozen=True)
class FinetuneConfig:
    mode: Literal["attention", "lora", "full", "none"]
    layers: tuple[int, int]  # attention modules i..j, 1-based, forward order, inclusive
    train_embedder: bool
    lora: LoraConfig  # used by mode: lora
    private: bool
    epsilon: float
    delta: float
    accountant: Literal["prv", "rdp"]
    epochs: int
    batch_size: int  # expected logical batch (Poisson sampling rate = batch_size / N)
    physical_batch_size: int  # rows per forward pass before the K copies
    clip_norm: float
    lr: float
    adam_beta1: float  # AdamW's first-moment (momentum) decay; its second-moment decay stays torch's 0.999
    # DP-AdamBC (dpldm.privacy.AdamBC): > 0 subtracts the DP noise's variance from Adam's second moment, floored at this
    # many times that variance; 0 = plain AdamW
    adam_bc_floor: float
    cosine_decay: bool  # lr decays along a cosine to 0 over the run's logical steps (no warm-up); false: constant
    noise_multiplicity: int  # K (DPDM)
    stratified_t: bool  # each example's K timesteps one per stratum of [0, T) (dpldm.diffusion.draw_timesteps)
    t_range: tuple[int, int]  # the DP fine-tuning's timesteps are drawn from [lo, hi) (default: all of [0, T))
    ema_decay: float
    # Seeded DP noise and Poisson sampling, for tests and debugging only: every output says "not a DP release".
    reproducible_noise: bool

    def __post_init__(self):
        i, j = self.layers
        check(1 <= i <= j, "finetune.layers", list(self.layers), "[i, j] with 1 <= i <= j (1-based, inclusive)")
        check(self.epsilon > 0, "finetune.epsilon", self.epsilon, "a number > 0")
        check(0 < self.delta < 1, "finetune.delta", self.delta, "a number in (0, 1), and below 1/N")
        check(self.epochs >= 1, "finetune.epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, "finetune.batch_size", self.batch_size, "an integer >= 1")
        check(self.physical_batch_size >= 1, "finetune.physical_batch_size", self.physical_batch_size, "an integer >= 1")
        check(self.clip_norm > 0, "finetune.clip_norm", self.clip_norm, "a number > 0")
        check(self.lr > 0, "finetune.lr", self.lr, "a number > 0")
        check(0 <= self.adam_beta1 < 1, "finetune.adam_beta1", self.adam_beta1, "a number in [0, 1)")
        check(self.adam_bc_floor >= 0, "finetune.adam_bc_floor", self.adam_bc_floor, "a number >= 0 (0 = plain AdamW)")
        check(self.noise_multiplicity >= 1, "finetune.noise_multiplicity", self.noise_multiplicity, "an integer K >= 1")
        lo, hi = self.t_range
        check(0 <= lo < hi, "finetune.t_range", list(self.t_range), "[lo, hi] with 0 <= lo < hi <= ldm.num_train_timesteps")
        check(0 <= self.ema_decay < 1, "finetune.ema_decay", self.ema_decay, "a number in [0, 1)")


SamplePrecision = Precision  # the sampler's network and decoder: fp32, bf16 autocast, or auto
# the reverse process: DDIM (eta from 0 = deterministic to 1 = DDPM-like), or diffusers' DPM-Solver++ of order 2,
# deterministic (ODE) or stochastic (SDE; Lu et al. 2022), which use eta not at all
SampleSolver = Literal["ddim", "dpmpp_2m", "dpmpp_2m_sde"]
# where the sampler's steps fall on [0, T) (diffusers' timestep_spacing; Lin et al. 2024 compare the three): "leading" = 0, T/n,
# ..., T - T/n (10 steps: 900 ... 0, so sampling starts below the noise it draws and spends a step at t = 0);
# "trailing" = T - 1, T - 1 - T/n, ..., T/n - 1 (999 ... 99); "linspace" = round(linspace(0, T - 1, n)) (999 ... 0)
SampleSpacing = Literal["leading", "trailing", "linspace"]


@dataclass(frozen=True)
class SampleConfig:
    per_class: int
    steps: int  # sampler steps (paper: 200 DDIM steps)
    eta: float  # DDIM only
    guidance_scale: float  # classifier-free guidance; 0 = off (paper default)
    batch_size: int
    precision: SamplePrecision
    solver: SampleSolver
    spacing: SampleSpacing

    def __post_init__(self):
        check(self.per_class >= 1, "sample.per_class", self.per_class, "an integer >= 1")
        check(self.steps >= 1, "sample.steps", self.steps, "an integer >= 1")
        check(0 <= self.eta <= 1, "sample.eta", self.eta, "a number in [0, 1]")
        check(self.guidance_scale >= 0, "sample.guidance_scale", self.guidance_scale, "a number >= 0")
        check(self.batch_size >= 1, "sample.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class FIDConfig:
    extractor: Literal["domain", "inception-v3-compat"]
    inception_weights: str  # local weights-inception-2015-12-05-6726825d.pth
    allow_download: bool
    kid_subset_size: int
    precision_recall: bool
    domain_epochs: int  # reference stage: epochs of the domain feature CNN

    def __post_init__(self):
        check(self.kid_subset_size >= 2, "fid.kid_subset_size", self.kid_subset_size, "an integer >= 2")
        check(self.domain_epochs >= 1, "fid.domain_epochs", self.domain_epochs, "an integer >= 1")


@dataclass(frozen=True)
class ClassifierConfig:
    cnn_epochs: int
    cnn_batch_size: int
    cnn_lr: float
    seeds: int  # CNN trained with this many seeds; mean and std reported
    val_fraction: float  # of the *synthetic* set, for model selection
    mlp_hidden: int
    mlp_max_iter: int
    logreg_C: float
    max_train: int  # cap on training images (0 = all)
    cnn_augment_shift: float  # the CNN's training images shifted by up to this share of their size (0 = off)
    cnn_augment_rotate: float  # ... rotated by up to this many degrees (0 = off)
    cnn_augment_scale: float  # ... scaled by a factor in [1 - s, 1 + s] (0 = off)

    def __post_init__(self):
        check(self.cnn_epochs >= 1, "classifier.cnn_epochs", self.cnn_epochs, "an integer >= 1")
        check(0 <= self.cnn_augment_shift <= 0.5, "classifier.cnn_augment_shift", self.cnn_augment_shift, "a number in [0, 0.5]")
        check(0 <= self.cnn_augment_rotate <= 180, "classifier.cnn_augment_rotate", self.cnn_augment_rotate, "degrees in [0, 180]")
        check(0 <= self.cnn_augment_scale < 1, "classifier.cnn_augment_scale", self.cnn_augment_scale, "a number in [0, 1)")
        check(self.seeds >= 1, "classifier.seeds", self.seeds, "an integer >= 1")
        check(0 < self.val_fraction < 0.5, "classifier.val_fraction", self.val_fraction, "a number in (0, 0.5)")
        check(self.logreg_C > 0, "classifier.logreg_C", self.logreg_C, "a number > 0")
        check(self.max_train >= 0, "classifier.max_train", self.max_train, "an integer >= 0")


@dataclass(frozen=True)
class AuditConfig:
    """The privacy audit (stage audit): white-box gradient canaries and black-box membership."""

    enabled: bool  # off: the stage only records that it did not run (the default `dvc repro` skips the audit's cost)
    canaries: int  # m Dirac gradient canaries, each included with probability 1/2
    epochs: int  # epochs of the audit's own DP run (dp_finetune's noise, rate, clip and K)
    guesses_in: int  # the auditor guesses "in" for this many top scores ...
    guesses_out: int  # ... and "out" for this many bottom scores; it abstains on the rest
    canary_norm_factor: float  # canary gradient norm before clipping, in units of finetune.clip_norm
    confidence: float  # of the epsilon lower bound
    membership_draws: int  # fixed (t, noise) draws per example for the black-box loss score
    membership_examples: int  # per split (private train = members, private test = non-members)
    seed: int  # the auditor's own secrets: inclusion bits, coordinates, canary sampling

    def __post_init__(self):
        check(self.canaries >= 2, "audit.canaries", self.canaries, "an integer >= 2")
        check(self.epochs >= 1, "audit.epochs", self.epochs, "an integer >= 1")
        check(self.guesses_in >= 0 and self.guesses_out >= 0 and 1 <= self.guesses_in + self.guesses_out <= self.canaries,
              "audit.guesses_in", self.guesses_in, "guesses_in, guesses_out >= 0 with 1 <= their sum <= audit.canaries")
        check(self.canary_norm_factor > 0, "audit.canary_norm_factor", self.canary_norm_factor, "a number > 0")
        check(0.5 <= self.confidence < 1, "audit.confidence", self.confidence, "a number in [0.5, 1)")
        check(self.membership_draws >= 1, "audit.membership_draws", self.membership_draws, "an integer >= 1")
        check(self.membership_examples >= 2, "audit.membership_examples", self.membership_examples, "an integer >= 2")


SECTIONS: dict[str, type] = {
    "runtime": RuntimeConfig,
    "data": DataConfig,
    "ae": AEConfig,
    "encode": EncodeConfig,
    "ldm": LDMConfig,
    "finetune": FinetuneConfig,
    "sample": SampleConfig,
    "fid": FIDConfig,
    "classifier": ClassifierConfig,
    "audit": AuditConfig,
}


def with_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict:
    """A copy of the params tree with ``{"finetune.lora.rank": 16}``-style overrides written in (as
    ``dvc exp run -S`` does); an override of a key params.yaml does not have is an error."""
    import copy

    out = copy.deepcopy(dict(params))
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(f"override {dotted!r}: no such key in params.yaml")
            node = node[key]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"override {dotted!r}: no such key in params.yaml")
        node[leaf] = value
    return out


def load_section(params: Mapping[str, Any], name: str) -> Any:
    """The typed config of section ``name`` from a params mapping (the whole params.yaml)."""
    if name not in SECTIONS:
        raise ConfigError(f"params: no section {name!r}; sections: {', '.join(SECTIONS)}")
    return from_mapping(SECTIONS[name], params.get(name), prefix=name)


def load_all(params: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        _fail(unknown[0], "...", "a known section: " + ", ".join(SECTIONS))
    return {name: load_section(params, name) for name in SECTIONS}


def to_dict(cfg: Any) -> dict:
    """JSON-friendly dict of a config (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
