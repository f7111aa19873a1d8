"""The downstream SmallCNN's training step on the same images with the strides ``uint8_to_input`` gives them (channels
last, as decoded from [N, H, W, C]) and with NCHW strides (what ``F.grid_sample`` returns), and on augmented batches as
``dpldm.metrics.random_affine`` returns them: the evidence for ``apply_affine``'s re-striding. For one-channel images the
two layouts hold the same bytes; oneDNN picks other kernels by the strides.

    python benchmarks/small_cnn_strides.py [--images data/public/images.parquet] [--n 1280] [--rounds 3]
        [--step-figure "0.46 s/step at 06:39 UTC"] [--out benchmarks/results/small_cnn_strides.md]

Public images by default (after ``dvc repro prepare_public``); nothing private is read."""
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
    ap.add_argument("--n", type=int, default=1280, help="images per timed pass (batches of classifier.cnn_batch_size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for provenance")
    ap.add_argument("--out", default="benchmarks/results/small_cnn_strides.md")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)

    import torch
    import torch.nn.functional as F

    from dpldm.config import load_section
    from dpldm.metrics import Augment, SmallCNN, random_affine, uint8_to_input
    from stages.common import read_images, read_params

    params = read_params("params.yaml")
    clf = load_section(params, "classifier")
    torch.set_num_threads(load_section(params, "runtime").threads or torch.get_num_threads())
    x, y, _ = read_images(args.images, split="train")
    x, y = uint8_to_input(x[:args.n]), torch.from_numpy(y[:args.n]).long()
    aug = Augment.of(clf)
    if not aug.active:
        aug = Augment(shift=0.0625, rotate=10.0, scale=0.1)
    moved = random_affine(x, aug, torch.Generator().manual_seed(0))
    # .contiguous() keeps a one-channel channels-last tensor as it is (it is contiguous in both senses): NCHW strides are
    # made explicitly, by copying into a fresh tensor
    nchw = lambda t: torch.empty(t.shape, dtype=t.dtype).copy_(t)  # noqa: E731
    variants = {
        "decoded (channels-last strides)": x,
        "decoded, NCHW strides": nchw(x),
        "augmented (random_affine: channels-last strides)": moved,
        "augmented, NCHW strides (grid_sample's own)": nchw(moved),
    }
    strides = {k: tuple(v.stride()) for k, v in variants.items()}
    torch.manual_seed(0)
    model = SmallCNN(channels=x.shape[1], image_size=x.shape[2], num_classes=int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=clf.cnn_lr)
    bs = clf.cnn_batch_size

    def one_pass(v):
        fwd = 0.0
        t = time.perf_counter()
        for i in range(0, len(y), bs):
            t0 = time.perf_counter()
            out = model(v[i:i + bs])
            fwd += time.perf_counter() - t0
            loss = F.cross_entropy(out, y[i:i + bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t, fwd

    one_pass(x)  # warm-up
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for k, v in variants.items():
            times[k].append(one_pass(v))
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1][0]:.3f} s" for k in variants), flush=True)
    mean = lambda k, j: sum(t[j] for t in times[k]) / len(times[k])  # noqa: E731
    base = next(iter(variants))
    lines = [provenance("small_cnn_strides.py", None, started), "",
             "# SmallCNN training step: channels-last against NCHW strides", "",
             f"{len(y)} public images per pass, batch {bs}, lr {clf.cnn_lr}, Adam; augmentation {aug}; "
             f"{torch.get_num_threads()} torch threads, alternated x {args.rounds}. That day's `benchmarks/pretrain_step.py`: "
             f"{args.step_figure or 'not given'}.", "",
             "| input | strides | s per pass (train step) | of which forward | x the decoded images' time |",
             "|---|---|---:|---:|---:|",
             *(f"| {k} | {strides[k]} | {mean(k, 0):.3f} | {mean(k, 1):.3f} | {mean(k, 0) / mean(base, 0):.2f} |" for k in variants)]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
