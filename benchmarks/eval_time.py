"""What the evaluation's classifiers cost in a workspace that has run `make repro`: one downstream CNN seed, the MLP and
the logistic regression, each fitted as ``stages.classify.fit_and_score`` fits them, on the synthetic samples
(score_classifier) and on the private train split (reference's real row); the domain extractor (reference) too.
Only times are written: no score, no image.

    python benchmarks/eval_time.py [--workspace .] [--rounds 2] [--step-figure '...'] [--out benchmarks/results/eval_time.md]

``classifier.seeds`` CNNs are trained in each of the two stages, so each seed beyond the first costs the two CNN rows.
The rounds alternate the parts so that a drifting machine hits them alike; the table gives each part's median."""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import provenance, write_table  # noqa: E402


def parts(workspace: Path, params: dict) -> dict:
    """{part name: a function that fits it once}, on the workspace's samples and private train split."""
    from dpldm.config import load_section
    from stages.classify import fit_cnn, fit_domain_extractor, fit_logreg, fit_mlp, split_validation
    from stages.common import read_images

    cfg, fcfg = load_section(params, "classifier"), load_section(params, "fid")
    out = {}
    for name, path, split in (("synthetic samples (score_classifier)", workspace / "data/samples/samples.parquet", None),
                              ("private train split (reference, real row)", workspace / "data/private/images.parquet", "train")):
        x, y, _ = read_images(path, split=split) if split else read_images(path)
        xt, yt, xv, yv = split_validation(x, y, fraction=cfg.val_fraction, seed=0)
        k = int(y.max()) + 1
        out[f"{name}: one CNN seed"] = (lambda xt=xt, yt=yt, xv=xv, yv=yv, k=k: fit_cnn(cfg, xt, yt, xv, yv, num_classes=k, seed=0),
                                        len(yt))
        out[f"{name}: MLP"] = (lambda xt=xt, yt=yt, xv=xv, yv=yv: fit_mlp(cfg, xt, yt, xv, yv, seed=0), len(yt))
        out[f"{name}: logistic regression"] = (lambda xt=xt, yt=yt, xv=xv, yv=yv: fit_logreg(cfg, xt, yt, xv, yv, seed=0), len(yt))
        if split:
            out[f"{name}: domain extractor"] = (lambda xt=xt, yt=yt, xv=xv, yv=yv, k=k: fit_domain_extractor(
                cfg, fcfg, xt, yt, xv, yv, num_classes=k, seed=0), len(yt))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=".", help="a checkout that has run make repro (its data/samples and data/private)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for provenance")
    ap.add_argument("--out", default="benchmarks/results/eval_time.md")
    args = ap.parse_args(argv)
    import torch
    import yaml

    started = datetime.datetime.now(datetime.timezone.utc)
    ws = Path(args.workspace)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    torch.set_num_threads(params["runtime"]["threads"] or torch.get_num_threads())
    todo, times = parts(ws, params), {}
    for _ in range(args.rounds):
        for name, (fit, _) in todo.items():
            t = time.perf_counter()
            fit()
            times.setdefault(name, []).append(time.perf_counter() - t)
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cnn = sum(v for name, v in med.items() if name.endswith("one CNN seed"))
    lines = [provenance("eval_time.py", argv, started), "",
             f"Workspace params: classifier.cnn_epochs {params['classifier']['cnn_epochs']}, fid.domain_epochs "
             f"{params['fid']['domain_epochs']}, {torch.get_num_threads()} torch threads; median of {args.rounds} rounds. "
             f"That day's benchmarks/pretrain_step.py: {args.step_figure or 'not given'}.", "",
             "| part | training examples | s |", "|---|---:|---:|"]
    lines += [f"| {name} | {todo[name][1]:,} | {v:.1f} |" for name, v in med.items()]
    lines += ["", f"Each CNN seed beyond the first costs both CNN rows: **{cnn:.1f} s** per seed per `make repro`."]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
