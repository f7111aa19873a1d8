"""Coverage of synthetic sets against the real private train split, beside the real test split as the yardstick.

    python benchmarks/coverage.py SAMPLES.parquet [SAMPLES.parquet ...] [--n 1000] [--out benchmarks/results/coverage.md]

For each set: torch-fidelity's k-NN precision and recall, FID and KID in the features of the `reference`
stage's domain CNN, and the label consistency (``dpldm.metrics.label_consistency``). Every set is cut to the
same size ``--n`` (the first ``n / classes`` images of each class), because k-NN recall grows with the number
of samples: the first row, the real *test* split (never seen by the CNN), says what "full coverage" reads at
that size. Run it in a workspace after ``make repro``; to score an experiment's samples, ``dvc exp apply NAME``
and ``dvc checkout data/samples/samples.parquet`` first, then copy the file. An evaluation on private data:
its table is an evaluation aggregate, and nothing may be tuned on it."""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpldm.metrics import SmallCNN, fidelity, label_consistency, register_domain_extractor  # noqa: E402
from provenance import provenance  # noqa: E402
from stages.common import load_model_files, read_images  # noqa: E402


def stratified(images: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n // classes`` images of each class, in class order."""
    classes = np.unique(labels)
    per = n // len(classes)
    short = [int(c) for c in classes if (labels == c).sum() < per]
    if short:
        raise SystemExit(f"coverage: --n {n} needs {per} images per class; classes {short} have fewer")
    idx = np.concatenate([np.flatnonzero(labels == c)[:per] for c in classes])
    return images[idx], labels[idx]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="+", help="samples.parquet files (the sample stage's format)")
    ap.add_argument("--private", default="data/private/images.parquet")
    ap.add_argument("--extractor", default="models/reference_extractor")
    ap.add_argument("--n", type=int, default=1000, help="images per set (stratified)")
    ap.add_argument("--out", default="benchmarks/results/coverage.md")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    state, conf = load_model_files(args.extractor)
    name = register_domain_extractor(state, conf)
    cnn = SmallCNN.from_state_dict(state, conf)
    real, _, _ = read_images(args.private, split="train")
    sets = [("real test split", *read_images(args.private, split="test")[:2])]
    sets += [(path, *read_images(path)[:2]) for path in args.samples]
    rows = []
    for label, images, labels in sets:
        x, y = stratified(images, labels, args.n)
        m = fidelity(x, real, extractor=name, tag="domain", kid_subset_size=min(1000, len(x)), precision_recall=True)
        rows.append({"set": label, "n": len(x), "precision": m["precision_domain"], "recall": m["recall_domain"],
                     "fid_domain": m["fid_domain"], **label_consistency(cnn, x, y)})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows).round(3).to_markdown(index=False)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(provenance("coverage.py", argv, started) + "\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
