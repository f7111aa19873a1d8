"""Stage reference: the real-to-real numbers every result is compared with, and the domain feature
extractor for FID. Depends on the private data only, so a new epsilon never re-runs it."""
from __future__ import annotations


from dpldm.config import load_section
from dpldm.metrics import SmallCNN
from stages.classify import fit_and_score, fit_domain_extractor, split_validation
from stages.common import log_live_metrics, read_images, save_model, setup_runtime, stage_main, write_json

INPUTS = ("private",)
OUTPUTS = ("extractor", "metrics", "live")


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    ccfg, fcfg = load_section(params, "classifier"), load_section(params, "fid")
    _, seed = setup_runtime(params, stage="reference")
    x, y, meta = read_images(inputs["private"], split="train")
    k = len(meta["class_names"])
    # domain feature extractor: SmallCNN on the real private train split (epoch chosen on a train holdout)
    xt, yt, xv, yv = split_validation(x, y, fraction=ccfg.val_fraction, seed=seed)
    fit = fit_domain_extractor(ccfg, fcfg, xt, yt, xv, yv, num_classes=k, seed=seed)
    save_model(outputs["extractor"], state_dict=fit.model.state_dict(),
               config={"channels": meta["channels"], "image_size": meta["height"], "num_classes": k,
                       "feature_dim": SmallCNN.feature_dim, "val_accuracy": fit.val_accuracy,
                       # trained on private data without DP: for scoring only, never a release
                       "evaluation_only": True, "dp": False})
    metrics, _ = fit_and_score(ccfg, x, y, lambda: read_images(inputs["private"], split="test")[:2], num_classes=k, seed=seed)
    metrics = {f"real_{k_}": v for k_, v in metrics.items()}
    metrics["domain_extractor_val_accuracy"] = fit.val_accuracy
    write_json(outputs["metrics"], metrics)
    log_live_metrics(outputs["live"], metrics)
    return metrics


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
