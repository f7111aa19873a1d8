"""Stage score_fid: FID and KID of the samples against the real *private train* split, with the
extractor named in params (``domain`` by default, or torch-fidelity's Inception from a local file), and
the samples' label consistency: the share that the reference stage's CNN assigns to their conditioning class."""
from __future__ import annotations

from pathlib import Path


from dpldm.config import load_section
from dpldm.metrics import INCEPTION_WEIGHTS_FILE, SmallCNN, content_hash, fidelity, label_consistency, register_domain_extractor
from stages.common import ConfigError, log_live_metrics, load_model_files, read_images, release_stamp, setup_runtime, stage_main

INPUTS = ("samples", "private", "extractor")
OUTPUTS = ("cache", "live")


def inception_weights(cfg) -> str | None:
    """The local Inception weights path, or a clear error naming the file, where to put it, and the way out."""
    if cfg.allow_download:
        return cfg.inception_weights or None
    path = Path(cfg.inception_weights) if cfg.inception_weights else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"fid.inception_weights = {cfg.inception_weights!r}: the Inception weights file is missing. Put torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILE} on this machine and set fid.inception_weights to its path, or set "
            f"fid.extractor: domain (no download needed), or fid.allow_download: true on a machine with network access.")
    return str(path)


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "fid")
    device, _ = setup_runtime(params, stage=None)
    weights = inception_weights(cfg) if cfg.extractor == "inception-v3-compat" else None
    synth, synth_y, synth_meta = read_images(inputs["samples"])
    real, real_y, _ = read_images(inputs["private"], split="train")
    state, conf = load_model_files(inputs["extractor"])  # the reference stage's CNN, trained on the private train split
    if cfg.extractor == "domain":
        name = register_domain_extractor(state, conf)
        tag = "domain"
    else:
        name, tag = "inception-v3-compat", "inception"
    Path(outputs["cache"]).mkdir(parents=True, exist_ok=True)
    metrics = fidelity(synth, real, extractor=name, tag=tag, kid_subset_size=cfg.kid_subset_size,
                       precision_recall=cfg.precision_recall, cuda=device.type == "cuda", weights_path=weights,
                       cache_root=outputs["cache"], real_cache_name=f"private-train-{content_hash(real, real_y)}-{name}")
    metrics.update(label_consistency(SmallCNN.from_state_dict(state, conf), synth, synth_y))  # do samples look like their label?
    metrics["fid_reference"] = "private train split"
    metrics["release"] = release_stamp(synth_meta)["release"]
    log_live_metrics(outputs["live"], metrics)
    return metrics


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
