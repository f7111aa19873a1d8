"""The downstream SmallCNN (``dpldm.metrics.train_cnn``, params.yaml's ``classifier`` batch and learning rate) trained
with max-pooling before its ReLUs (the library's order) and with the textbook order (ReLU, then pool), alternated on the
same images and seed: the evidence for the order. Both compute the same function and gradients (a test checks bit
equality), so the two trainings must end with the same losses and accuracies; the script checks that too.

    python benchmarks/small_cnn_order.py [--images data/public/images.parquet] [--n 10000] [--epochs 2] [--rounds 2]
        [--step-figure "0.39 s/step at 07:07 UTC"] [--out benchmarks/results/small_cnn_order.md]

Public images by default (the embedded default's printed digits, after ``dvc repro prepare_public``); nothing private
is read. 90% train, 10% validation, as ``classifier.val_fraction``."""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance, write_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="data/public/images.parquet")
    ap.add_argument("--n", type=int, default=10000, help="images used (as the 10,000 synthetic digits)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for provenance")
    ap.add_argument("--out", default="benchmarks/results/small_cnn_order.md")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)

    import torch
    from torch import nn

    from dpldm.config import load_section
    from dpldm.metrics import SmallCNN, train_cnn
    from stages.common import read_images, read_params

    params = read_params("params.yaml")
    clf = load_section(params, "classifier")
    torch.set_num_threads(load_section(params, "runtime").threads or torch.get_num_threads())
    x, y, _ = read_images(args.images, split="train")
    x, y = x[:args.n], y[:args.n]
    n_val = int(round(len(y) * clf.val_fraction))
    tx, ty, vx, vy = x[n_val:], y[n_val:], x[:n_val], y[:n_val]

    library_init = SmallCNN.__init__

    def textbook_init(self, **kw):
        library_init(self, **kw)
        m = list(self.features)  # conv, pool, ReLU (x2) -> conv, ReLU, pool (x2)
        self.features = nn.Sequential(m[0], m[2], m[1], m[3], m[5], m[4], *m[6:])

    orders = {"pool, then ReLU (library)": library_init, "ReLU, then pool (textbook)": textbook_init}
    seconds: dict[str, list[float]] = {k: [] for k in orders}
    history: dict[str, list] = {}
    try:
        for r in range(args.rounds):
            for name, init in orders.items():
                SmallCNN.__init__ = init
                t0 = time.perf_counter()
                fit = train_cnn(tx, ty, vx, vy, num_classes=int(y.max()) + 1, epochs=args.epochs,
                                batch_size=clf.cnn_batch_size, lr=clf.cnn_lr, seed=0)
                seconds[name].append(time.perf_counter() - t0)
                history[name] = fit.history
                print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s, {fit.history[-1]}", flush=True)
    finally:
        SmallCNN.__init__ = library_init
    same = len({repr(h) for h in history.values()}) == 1
    lib, text = (sum(v) / len(v) for v in seconds.values())
    lines = [provenance("small_cnn_order.py", None, started), "",
             "# SmallCNN: max-pool before ReLU against the textbook order", "",
             f"{len(ty)} train / {n_val} validation public images, {args.epochs} epochs, batch {clf.cnn_batch_size}, "
             f"lr {clf.cnn_lr}, seed 0, {torch.get_num_threads()} torch threads, alternated x {args.rounds}. That day's "
             f"`benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}.", "",
             "| order | seconds per training | mean |", "|---|---:|---:|",
             *(f"| {k} | {', '.join(f'{s:.1f}' for s in v)} | {sum(v) / len(v):.1f} |" for k, v in seconds.items()), "",
             f"Ratio textbook / library: **{text / lib:.2f}x**. Per-epoch losses and validation accuracies identical: "
             f"**{'yes' if same else 'NO'}** (last epoch: {history[next(iter(history))][-1]})."]
    write_table(args.out, lines)
    if not same:
        raise SystemExit("the two orders trained differently: they should compute the same function")


if __name__ == "__main__":
    main()
