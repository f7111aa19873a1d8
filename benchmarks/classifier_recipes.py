"""The downstream CNN's training recipe (``classifier.cnn_augment_*``, ``classifier.cnn_epochs``), judged on public data
only: each recipe trains the SmallCNN on a set of images (synthetic samples, or real public images), chooses its epoch on
a held-out slice of that set (as ``score_classifier`` does), and is tested on another, public, set of real images.

    python benchmarks/classifier_recipes.py \\
        --case proxy-dp=<proxy workspace>/data/samples/samples.parquet@<proxy workspace>/data/private/images.parquet:test \\
        --case fonts-to-8x8=data/public/images.parquet:train@<proxy workspace>/data/private/images.parquet \\
        --recipe none: --recipe shift:shift=0.1 --recipe affine:shift=0.1,rotate=10,scale=0.1 \\
        [--seeds 3] [--max-train 10000] [--step-figure "..."] [--out benchmarks/results/classifier_recipes.md]

A case is ``NAME=TRAIN[:SPLIT]@TEST[:SPLIT]`` (parquet files written by the prepare and sample stages). The test set must
be public (invariant 7): a source of the embedded default's public set or the public proxy (``PUBLIC_SOURCES``); the
private data's test split is read by ``score_classifier`` only, after every choice is made. A recipe is
``NAME:key=value,...`` with keys ``shift`` (fraction of the image size), ``rotate`` (degrees), ``scale`` (fraction) and
``epochs`` (default: params.yaml's ``classifier.cnn_epochs``); the batch size and lr are params.yaml's.

Writes a table of the test accuracy (mean ± std over the CNN seeds), the synthetic-validation accuracy and the seconds per
CNN, with the command, commit and the day's ``benchmarks/pretrain_step.py`` figure as provenance."""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance, with_ext, write_table  # noqa: E402

PUBLIC_SOURCES = ("fontdigits", "digits8x8")
RECIPE_KEYS = {"shift": float, "rotate": float, "scale": float, "epochs": int}


def parse_recipe(text: str) -> tuple[str, dict]:
    """``NAME:key=value,...`` -> (NAME, {key: value}); unknown keys and bad values stop with the recipe's text."""
    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"--recipe {text!r}: expected NAME:key=value,... (e.g. shift:shift=0.1)")
    out = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in RECIPE_KEYS:
            raise SystemExit(f"--recipe {text!r}: unknown key {key!r}; expected one of {', '.join(RECIPE_KEYS)}")
        try:
            out[key] = RECIPE_KEYS[key](value)
        except ValueError:
            raise SystemExit(f"--recipe {text!r}: {key}={value!r} is not a {RECIPE_KEYS[key].__name__}") from None
    return name, out


def parse_case(text: str) -> tuple[str, tuple[str, str | None], tuple[str, str | None]]:
    """``NAME=TRAIN[:SPLIT]@TEST[:SPLIT]`` -> (NAME, (path, split), (path, split))."""
    name, _, rest = text.partition("=")
    train, _, test = rest.partition("@")
    if not (name and train and test):
        raise SystemExit(f"--case {text!r}: expected NAME=TRAIN[:SPLIT]@TEST[:SPLIT]")
    split = lambda s: (s.rsplit(":", 1)[0], s.rsplit(":", 1)[1]) if s.rsplit(":", 1)[-1] in ("train", "test") else (s, None)
    return name, split(train), split(test)


def load(path: str, split: str | None, *, public_only: bool):
    from stages.common import read_images

    x, y, meta = read_images(path, split=split)
    if public_only and meta.get("source") not in PUBLIC_SOURCES:
        raise SystemExit(f"{path}: source {meta.get('source')!r} is not public ({', '.join(PUBLIC_SOURCES)}): a setting may "
                         f"only be chosen on public data (invariant 7)")
    return x, y


def cnn_seeds(xt, yt, xv, yv, test_x, test_y, *, num_classes: int, epochs: int, clf, augment, seeds: int):
    """``seeds`` SmallCNNs (seeds 0, 1, ...) trained as score_classifier trains them, with ``clf``'s batch size and lr and
    the epoch chosen on (xv, yv), each then tested on (test_x, test_y): lists of (test accuracy, validation accuracy,
    chosen epoch, seconds), one entry per seed."""
    from dpldm.metrics import predict, train_cnn

    accs, vals, best, secs = [], [], [], []
    for s in range(seeds):
        t0 = time.perf_counter()
        fit = train_cnn(xt, yt, xv, yv, num_classes=num_classes, epochs=epochs, batch_size=clf.cnn_batch_size, lr=clf.cnn_lr,
                        seed=s, augment=augment)
        secs.append(time.perf_counter() - t0)
        accs.append(float((predict(fit.model, test_x) == test_y).mean()))
        vals.append(fit.val_accuracy)
        best.append(fit.best_epoch)
    return accs, vals, best, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, help="NAME=TRAIN[:SPLIT]@TEST[:SPLIT]")
    ap.add_argument("--recipe", action="append", required=True, help="NAME:key=value,... (keys: shift, rotate, scale, epochs)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-train", type=int, default=10000, help="train images used per case (a seeded random subset)")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for provenance")
    ap.add_argument("--out", default="benchmarks/results/classifier_recipes.md")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    recipes = [parse_recipe(r) for r in args.recipe]
    cases = [parse_case(c) for c in args.case]

    import torch

    from dpldm.config import load_section
    from dpldm.metrics import Augment
    from stages.classify import split_validation
    from stages.common import read_params

    params = read_params("params.yaml")
    clf = load_section(params, "classifier")
    torch.set_num_threads(load_section(params, "runtime").threads or torch.get_num_threads())
    rows = []
    for case, (train_path, train_split), (test_path, test_split) in cases:
        x, y = load(train_path, train_split, public_only=False)
        if args.max_train and len(y) > args.max_train:
            keep = np.random.default_rng(0).choice(len(y), args.max_train, replace=False)
            x, y = x[keep], y[keep]
        xt, yt, xv, yv = split_validation(x, y, fraction=clf.val_fraction, seed=0)
        test_x, test_y = load(test_path, test_split, public_only=True)
        k = int(max(y.max(), test_y.max())) + 1
        for name, r in recipes:
            aug = Augment(shift=r.get("shift", 0.0), rotate=r.get("rotate", 0.0), scale=r.get("scale", 0.0))
            epochs = r.get("epochs", clf.cnn_epochs)
            accs, vals, best, secs = cnn_seeds(xt, yt, xv, yv, test_x, test_y, num_classes=k, epochs=epochs, clf=clf,
                                               augment=aug, seeds=args.seeds)
            rows.append({"case": case, "recipe": name, "shift": aug.shift, "rotate": aug.rotate, "scale": aug.scale,
                         "epochs": epochs, "test_accuracy": float(np.mean(accs)), "test_std": float(np.std(accs)),
                         "val_accuracy": float(np.mean(vals)), "best_epochs": " ".join(map(str, best)),
                         "s_per_cnn": float(np.mean(secs)), "n_train": len(yt), "n_val": len(yv), "n_test": len(test_y)})
            print(f"{case} {name}: test {np.mean(accs):.4f} ± {np.std(accs):.4f} val {np.mean(vals):.4f} "
                  f"epochs {best} {np.mean(secs):.1f} s", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(with_ext(args.out, ".csv"), index=False)
    lines = [provenance("classifier_recipes.py", None, started), "",
             "# The downstream CNN's training recipe, judged on public data", "",
             f"SmallCNN, batch {clf.cnn_batch_size}, lr {clf.cnn_lr}, epoch chosen on a {clf.val_fraction:.0%} synthetic "
             f"validation slice of the train set (never augmented), {args.seeds} CNN seeds, {torch.get_num_threads()} torch "
             f"threads. That day's `benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}.", "",
             "Cases: " + "; ".join(f"**{c}**: train {tp}{':' + ts if ts else ''}, test {sp}{':' + ss if ss else ''}"
                                   for c, (tp, ts), (sp, ss) in cases), "",
             "| case | recipe | shift | rotate | scale | epochs | test accuracy (std) | synthetic val | best epochs | s per CNN |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
             *(f"| {r.case} | {r.recipe} | {r.shift:g} | {r.rotate:g} | {r.scale:g} | {r.epochs} | **{100 * r.test_accuracy:.1f}** "
               f"({100 * r.test_std:.1f}) | {100 * r.val_accuracy:.1f} | {r.best_epochs} | {r.s_per_cnn:.1f} |"
               for r in df.itertuples())]
    write_table(with_ext(args.out, ".md"), lines)


if __name__ == "__main__":
    main()
