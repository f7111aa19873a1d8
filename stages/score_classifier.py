"""Stage score_classifier: train on synthetic, test on real. Model selection uses a held-out
*synthetic* validation split; the real test split is read only after every choice is made."""
from __future__ import annotations

import numpy as np

from dpldm.config import load_section
from stages.classify import fit_and_score
from stages.common import log_live_metrics, read_images, read_json, release_stamp, setup_runtime, stage_main

INPUTS = ("samples", "private", "reference")
OUTPUTS = ("confusion", "live")


def read_real_test(path) -> tuple[np.ndarray, np.ndarray]:
    x, y, _ = read_images(path, split="test")
    return x, y


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "classifier")
    _, seed = setup_runtime(params, stage="score_classifier")
    x, y, meta = read_images(inputs["samples"])
    k = len(meta["class_names"])
    metrics, cm = fit_and_score(cfg, x, y, lambda: read_real_test(inputs["private"]), num_classes=k, seed=seed)
    ref = read_json(inputs["reference"])
    for name in ("cnn", "mlp", "logreg"):
        metrics[f"{name}_ratio_to_real"] = metrics[f"{name}_accuracy"] / max(ref[f"real_{name}_accuracy"], 1e-12)
    metrics["release"] = release_stamp(meta)["release"]
    _save_confusion(outputs["confusion"], cm, meta["class_names"], metrics["cnn_accuracy"],
                    note="" if release_stamp(meta)["dp_release"] else "NOT A DP RELEASE")
    log_live_metrics(outputs["live"], metrics)
    return metrics


def _save_confusion(path, cm: np.ndarray, names: list[str], acc: float, *, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.common import atomic_path

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted (CNN trained on synthetic)")
    ax.set_ylabel("true (real test split)")
    ax.set_title(f"CNN accuracy {100 * acc:.1f}%" + (f" ({note})" if note else ""))
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if v > cm.max() / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
