"""Loading the models the stages save (state_dict + config JSON; no pickled code). Not a stage: the
stages that read a model import it, so no stage imports another stage. Both loaders refuse an
``evaluation_only`` model (one trained on private data without DP)."""
from __future__ import annotations

from dpldm.config import AEConfig, LDMConfig, from_mapping
from dpldm.models import DIFFUSERS_FF_MULT, ConditionalUNet, build_autoencoder, build_ldm
from stages.common import load_model_files


def load_ldm(folder) -> tuple[ConditionalUNet, LDMConfig, dict]:
    state, conf = load_model_files(folder, generator=True)
    fields = {k: v for k, v in conf.items() if k in LDMConfig.__dataclass_fields__}
    fields.setdefault("snr_gamma", 0.0)  # a training-only key; models saved before it existed were trained without it
    fields.setdefault("ff_mult", DIFFUSERS_FF_MULT)  # models saved before the key existed have diffusers' feed-forward
    cfg = from_mapping(LDMConfig, fields, prefix="ldm")
    model = build_ldm(cfg, latent_channels=conf["latent_shape"][0], latent_size=conf["latent_shape"][1])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RuntimeError(f"checkpoint {folder} does not match the architecture in its config.json: {err}") from None
    return model, cfg, conf


def load_autoencoder(folder):
    state, conf = load_model_files(folder, generator=True)
    fields = {k: v for k, v in conf.items() if k in AEConfig.__dataclass_fields__}
    ae = build_autoencoder(from_mapping(AEConfig, fields, prefix="ae"), channels=conf["channels"], image_size=conf["image_size"])
    ae.load_state_dict(state)
    ae.eval().requires_grad_(False)
    return ae, conf
