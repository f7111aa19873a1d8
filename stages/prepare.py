"""Shared body of ``prepare_public`` and ``prepare_private``: load a source, write Parquet, a
manifest, an example grid per class, and DVCLive metrics."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from dpldm.config import load_section, to_dict
from dpldm.data import load_source
from stages.common import image_grid, log_live_metrics, save_png, setup_runtime, write_images, write_json

INPUTS: tuple[str, ...] = ()
OUTPUTS = ("data", "manifest", "grid", "live")


def run_prepare(params: dict, outputs: dict, *, which: str) -> dict:
    cfg = getattr(load_section(params, "data"), which)
    _, seed = setup_runtime(params, stage=f"prepare_{which}")
    threads = load_section(params, "runtime").threads  # fontdigits renders in this many processes (0: one per core)
    loaded = load_source(cfg, seed=seed, workers=threads or os.cpu_count() or 1)
    tr, te = loaded.train, loaded.test
    images = np.concatenate([tr.images, te.images])
    labels = np.concatenate([tr.labels, te.labels])
    split = ["train"] * len(tr) + ["test"] * len(te)
    write_images(outputs["data"], images=images, labels=labels, split=split,
                 source_index=np.concatenate([tr.source_index, te.source_index]),
                 class_names=loaded.class_names, source=cfg.source)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes() + "".join(split).encode()).hexdigest()
    counts = {s: {name: int((part.labels == k).sum()) for k, name in enumerate(loaded.class_names)}
              for s, part in (("train", tr), ("test", te))}
    manifest = {
        "role": which, "source": cfg.source, "config": to_dict(cfg), "seed": seed,
        "n_train": len(tr), "n_test": len(te), "height": int(images.shape[1]), "width": int(images.shape[2]),
        "channels": int(images.shape[3]), "class_names": loaded.class_names, "counts": counts,
        "content_sha256": digest,
    }
    write_json(outputs["manifest"], manifest)
    if cfg.preview_grid:
        save_png(outputs["grid"], image_grid(tr.images, tr.labels, per_class=12, num_classes=len(loaded.class_names)))
    else:  # the output still exists (dvc.yaml declares it) but shows no record
        save_png(outputs["grid"], np.full((24, 420, 1), 255, np.uint8), scale=1,
                 banner=f"preview off: set data.{which}.preview_grid: true to render example images")
    metrics = {"n_train": len(tr), "n_test": len(te), "num_classes": len(loaded.class_names)}
    if which == "public":  # a statistic of private images is not for logs or metrics
        metrics["pixel_mean"] = float(tr.images.mean() / 255.0)
    log_live_metrics(outputs["live"], metrics)
    return metrics
