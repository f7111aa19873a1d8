"""Networks: diffusers' AutoencoderKL and UNet2DConditionModel built from our configs, our class
embedder, and the numbering of the paper's "attention modules".

No file I/O here: stages save ``state_dict`` plus the config as JSON.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .config import AEConfig, LDMConfig


# ----------------------------------------------------------------------------------------------
# Autoencoder (LDM stage 1)


def build_autoencoder(cfg: AEConfig, *, channels: int, image_size: int) -> AutoencoderKL:
    """KL-regularised conv autoencoder; f = 2 ** (len(block_out_channels) - 1)."""
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        latent_channels=cfg.latent_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=image_size,
    )


def latent_shape(cfg: AEConfig, *, image_size: int) -> tuple[int, int, int]:
    f = 2 ** (len(cfg.block_out_channels) - 1)
    return (cfg.latent_channels, image_size // f, image_size // f)


# ----------------------------------------------------------------------------------------------
# Class-conditional latent UNet


class ClassEmbedder(nn.Module):
    """Label -> cross-attention context [B, 1, D] and, with ``time_dim``, a vector [B, time_dim] that the
    UNet adds to its time embedding. Index ``num_classes`` is the null class used for classifier-free
    guidance (label dropout during pretraining).

    Cross-attention to a single token is weak conditioning: the softmax over one key is 1, so each
    attention layer adds the same class vector at every position. The time-embedding path reaches every
    ResNet block, as in ADM-style class-conditional UNets."""

    def __init__(self, *, num_classes: int, dim: int, time_dim: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)
        self.time_embedding = nn.Embedding(num_classes + 1, time_dim) if time_dim else None

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        context = self.embedding(y)[:, None, :]  # [B, 1, D]
        return context, (self.time_embedding(y) if self.time_embedding is not None else None)


class ConditionalUNet(nn.Module):
    """eps_theta(z_t, t, y): diffusers UNet conditioned through ``encoder_hidden_states``."""

    def __init__(self, unet: UNet2DConditionModel, class_embedder: ClassEmbedder):
        super().__init__()
        self.unet = unet
        self.class_embedder = class_embedder

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        context, class_emb = self.class_embedder(y)  # [B, 1, D], [B, time_dim] or None
        return self.unet(z_t, t, encoder_hidden_states=context, class_labels=class_emb, return_dict=False)[0]


class OneTokenCrossAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor, with a shortcut for cross-attention to a one-token context (our class
    token): the softmax over one key is exactly 1, so every query position gets that token's value. It is
    computed for the first position only, with an explicit softmax, and broadcast. ``to_q`` and ``to_k`` stay
    in the graph (opacus sees every trainable layer run) and get exactly zero gradient, as the math says:
    softmax's backward over one element is ``g - g``. (SDPA's fused backward leaves rounding residue of about
    1e-12 there, whose squares in opacus' per-example norms are float denormals, slow on the CPU.) Same
    outputs (bit for bit on one thread; to float rounding on more, where SDPA splits its reductions), and the
    same gradients up to summation order elsewhere, for about 10% less time per LDM training step and 15% per DP
    step on the embedded default (``benchmarks/pretrain_step.py``'s last two rows; ``benchmarks/dp_step.py --ab
    cross-attention``). Anything else (a longer context, masks, 4-D input, q/k norms, norms or dropout that act per
    position) goes the general way."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        dropout = attn.to_out[1] if len(attn.to_out) > 1 else None
        if (encoder_hidden_states is None or encoder_hidden_states.shape[1] != 1 or attention_mask is not None
                or hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.norm_cross or attn.norm_q is not None or attn.norm_k is not None or attn.residual_connection
                or args or kwargs or (isinstance(dropout, nn.Dropout) and dropout.p > 0 and attn.training)):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        b, h = hidden_states.shape[0], attn.heads
        heads = lambda x: x.view(b, 1, h, -1).transpose(1, 2)  # [B, 1, h*d] -> [B, h, 1, d]
        q, k, v = heads(attn.to_q(hidden_states[:, :1])), heads(attn.to_k(encoder_hidden_states)), heads(attn.to_v(encoder_hidden_states))
        weight = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)  # [B, h, 1, 1], exactly 1
        out = (weight @ v).transpose(1, 2).reshape(b, 1, -1)
        out = attn.to_out[0](out)
        if dropout is not None:
            out = dropout(out)
        return (out / attn.rescale_output_factor).expand(-1, hidden_states.shape[1], -1)


def use_one_token_cross_attention(unet: UNet2DConditionModel) -> None:
    """Give every cross-attention layer ``OneTokenCrossAttnProcessor`` (self-attention keeps SDPA)."""
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.set_processor(OneTokenCrossAttnProcessor())


DIFFUSERS_FF_MULT = 4  # BasicTransformerBlock's feed-forward width, in multiples of its channels


def build_unet(cfg: LDMConfig, *, latent_channels: int, latent_size: int) -> UNet2DConditionModel:
    n = len(cfg.block_out_channels)
    levels = set(range(n)) if not cfg.attention_levels else set(cfg.attention_levels)
    down = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if (n - 1 - i) in levels else "UpBlock2D" for i in range(n))
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups,
        class_embed_type="identity" if cfg.class_time_embedding else None,  # adds ClassEmbedder's vector
    )
    if cfg.ff_mult != DIFFUSERS_FF_MULT:
        set_ff_mult(unet, cfg.ff_mult)
    use_one_token_cross_attention(unet)
    return unet


def set_ff_mult(unet: UNet2DConditionModel, mult: int) -> None:
    """Give every transformer block a freshly initialised feed-forward of width ``mult`` x its channels
    (diffusers' UNet2DConditionModel has no argument for it; its blocks use 4). The rest of each block,
    GEGLU activation and biases included, stays as diffusers builds it."""
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            old = block.ff
            block.ff = FeedForward(block.dim, mult=mult, activation_fn="geglu", bias=old.net[2].bias is not None)


def time_embed_dim(cfg: LDMConfig) -> int:
    """UNet2DConditionModel's time-embedding width (its default: 4 x the first block's channels)."""
    return cfg.block_out_channels[0] * 4


def build_ldm(cfg: LDMConfig, *, latent_channels: int, latent_size: int) -> ConditionalUNet:
    return ConditionalUNet(
        build_unet(cfg, latent_channels=latent_channels, latent_size=latent_size),
        ClassEmbedder(num_classes=cfg.num_classes, dim=cfg.cross_attention_dim,
                      time_dim=time_embed_dim(cfg) if cfg.class_time_embedding else 0),
    )


@dataclass(frozen=True)
class AttentionModule:
    index: int  # 1-based, in forward order
    name: str  # qualified name inside the ConditionalUNet
    num_params: int


def attention_modules(model: ConditionalUNet) -> list[AttentionModule]:
    """The spatial-transformer blocks numbered 1..N in the order the forward pass visits them:
    down blocks, the middle block, then up blocks. (diffusers registers ``mid_block`` after
    ``up_blocks``, so ``named_modules()`` order would be wrong.)"""
    unet = model.unet
    groups = [(f"unet.down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        groups.append(("unet.mid_block", unet.mid_block))
    groups += [(f"unet.up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    out = []
    for prefix, block in groups:
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            out.append(AttentionModule(len(out) + 1, f"{prefix}.attentions.{j}", sum(p.numel() for p in attn.parameters())))
    return out


# ----------------------------------------------------------------------------------------------
# LoRA adapters (peft) in chosen attention modules

LORA_TARGETS = {  # finetune.lora.targets -> module name patterns inside a Transformer2DModel
    "to_q": r"attn\d\.to_q", "to_k": r"attn\d\.to_k", "to_v": r"attn\d\.to_v", "to_out": r"attn\d\.to_out\.0",
    "ff": r"ff\.net\.(0\.proj|2)", "proj_in": r"proj_in", "proj_out": r"proj_out",
}


def lora_pattern(modules: list[AttentionModule], targets: tuple[str, ...]) -> str:
    """The regular expression peft full-matches against the UNet's module names: the ``targets`` inside
    the given attention modules only."""
    import re

    prefixes = "|".join(re.escape(m.name.removeprefix("unet.")) for m in modules)
    return rf"^({prefixes})\.(.*\.)?({'|'.join(LORA_TARGETS[t] for t in targets)})$"


def add_lora(model: ConditionalUNet, modules: list[AttentionModule], *, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """peft LoRA adapters (diffusers' ``add_adapter``) on ``targets`` in ``modules``. B starts at zero, so
    the adapted model equals the base model until it trains."""
    from peft import LoraConfig

    model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_pattern(modules, targets),
                                      init_lora_weights=True))


def merge_lora(model: ConditionalUNet) -> dict[str, torch.Tensor]:
    """Fold the adapters into the base weights and remove them: the model has the plain architecture
    again (what ``sample`` loads). Returns the adapter weights (peft's state dict, small) first."""
    from peft import get_peft_model_state_dict

    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model.unet).items()}
    model.unet.fuse_lora()
    model.unet.unload_lora()
    return adapter


# ----------------------------------------------------------------------------------------------
# Paper presets (shapes of the official configs), for tests and for users with bigger machines

PRESETS: dict[str, dict] = {
    # name: overrides of the ae and ldm sections, and the image (channels, size)
    "mnist": {"ae": {"block_out_channels": (32, 64, 64, 64), "latent_channels": 3},
              "ldm": {"block_out_channels": (64, 128), "layers_per_block": 1, "attention_head_dim": 32,
                      "cross_attention_dim": 64, "attention_levels": ()},
              "image": (3, 32)},
    "cifar10": {"ae": {"block_out_channels": (64, 128), "latent_channels": 3},
                "ldm": {"block_out_channels": (128, 256, 256, 512), "layers_per_block": 2, "attention_head_dim": 32,
                        "cross_attention_dim": 512, "attention_levels": (0, 1, 2)},
                "image": (3, 32)},
    "celeba32": {"ae": {"block_out_channels": (64, 128), "latent_channels": 3},
                 "ldm": {"block_out_channels": (128, 256, 256, 512), "layers_per_block": 2, "attention_head_dim": 32,
                         "cross_attention_dim": 512, "attention_levels": (0, 1, 2), "num_classes": 2},
                 "image": (3, 32)},
}


def preset(name: str, *, ae: AEConfig, ldm: LDMConfig, **ldm_overrides) -> tuple[AEConfig, LDMConfig, int, int]:
    """The paper's shapes for ``name`` applied over the given configs (training settings are kept)."""
    p = PRESETS[name]
    c, s = p["image"]
    return replace(ae, **p["ae"]), replace(ldm, **{**p["ldm"], **ldm_overrides}), c, s


@torch.no_grad()
def encode_mean(ae, x: torch.Tensor, *, batch_size: int, device) -> torch.Tensor:
    """Posterior means of the frozen encoder, [N, c, h, w] (unscaled)."""
    ae.eval()
    return torch.cat([ae.encode(x[i:i + batch_size].to(device)).latent_dist.mean.cpu() for i in range(0, len(x), batch_size)])


def count_params(module: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
