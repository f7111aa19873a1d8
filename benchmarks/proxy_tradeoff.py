"""What cheaper settings of the DP fine-tuning, the sampler's sample count and the downstream CNN cost on the *public
proxy* (invariant 7): each variant runs the pipeline's own stages (dp_finetune, sample, score_fid) from a proxy
workspace's public models on the proxy's private set (a public one), timing each stage; then the downstream CNN, with
params.yaml's recipe, is trained on the first N samples per class of each release for every ``--samples`` N and every
``--cnn-epochs`` E, and tested on the proxy's real test digits.

    python scripts/apply_profile.py benchmarks/profiles/public_proxy.yaml && make repro   # in a copy (the workspace)
    python benchmarks/proxy_tradeoff.py --workspace <proxy workspace> --variant default: \\
        --variant dp10:finetune.epochs=10 --repeats 2 --samples 10000 6000 --cnn-epochs 8 6 \\
        [--scratch DIR] [--step-figure "..."] [--out benchmarks/results/proxy_tradeoff]

A variant is ``name:key=value,...`` (keys of params.yaml, written into a copy of the workspace's params.yaml; the
stages run this checkout's code). ``--release name/REPEAT=SAMPLES.parquet`` scores samples made before, by the stages
with variant ``name``'s settings: a variant that has releases is not run (its overrides only label the table, and its
stage times are not measured). The DP noise is the OS's, as in a real run: each repeat is an independent DP run of
the proxy. The reference extractor (label consistency, fid_domain) is trained once per scratch folder by the
reference stage, on the proxy's train digits. The script stops unless the workspace's ``data.private.source`` is
public: a choice read off the real private data would sit outside the ledger."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from classifier_recipes import PUBLIC_SOURCES, cnn_seeds, load  # noqa: E402
from provenance import provenance, with_ext, write_table  # noqa: E402

def parse_variant(text: str) -> tuple[str, dict]:
    from pipeline.sweep import parse_assignments

    name, sep, rest = text.partition(":")
    if not sep or not name or "/" in name:
        raise SystemExit(f"--variant {text!r}: expected name:key=value,... (name: alone for the workspace's params; no '/')")
    return name, parse_assignments(rest) if rest else {}


def parse_release(text: str) -> tuple[str, int, Path]:
    key, _, path = text.partition("=")
    name, _, r = key.partition("/")
    if not (name and r.isdigit() and path):
        raise SystemExit(f"--release {text!r}: expected name/REPEAT=SAMPLES.parquet")
    return name, int(r), Path(path).resolve()


def check_public(params: dict, path: Path) -> None:
    source = params["data"]["private"]["source"]
    if source not in PUBLIC_SOURCES:
        raise SystemExit(f"{path}: data.private.source is {source!r}; this benchmark chooses settings, so it "
                         f"runs only on a public proxy ({', '.join(PUBLIC_SOURCES)}): apply benchmarks/profiles/public_proxy.yaml "
                         f"in a copy of the repo and run `make repro` there first (invariant 7)")


def first_per_class(y: np.ndarray, n_per_class: int) -> np.ndarray:
    """Indices of the first ``n_per_class`` rows of each class, in row order (the sample stage writes each class's
    samples in the order it drew them, so this is what a run with ``sample.per_class`` = n would have kept of its draws'
    distribution). Fails if a class has fewer rows."""
    keep = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) < n_per_class:
            raise SystemExit(f"class {c} has {len(rows)} samples, fewer than the {n_per_class} asked for (--samples)")
        keep.append(rows[:n_per_class])
    return np.sort(np.concatenate(keep))


def run_stage(stage: str, params_path: Path, ios: list[str], log: Path) -> float:
    """``python -m stages.<stage> --params P <ios>`` from this checkout; returns its wall seconds; the stage's output goes
    to ``log`` (stops with the log's tail if the stage fails)."""
    cmd = [sys.executable, "-m", f"stages.{stage}", "--params", str(params_path), *ios]
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "DPLDM_PROGRESS": "0"}).returncode
    if rc:
        raise SystemExit(f"stage {stage} failed (exit {rc}); its log: {log}\n" + "".join(open(log).readlines()[-15:]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", required=True, help="a proxy workspace that has run make repro (public models, proxy data)")
    ap.add_argument("--params", default=None, help="the proxy's params file (default: the workspace's params.yaml)")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,...")
    ap.add_argument("--release", action="append", default=[], help="name/REPEAT=SAMPLES.parquet: score samples made before")
    ap.add_argument("--repeats", type=int, default=2, help="independent DP runs per variant")
    ap.add_argument("--samples", type=int, nargs="+", default=[10000], help="synthetic digits the CNN trains on (a multiple of "
                    "the class count; at most the variant's sample.per_class x classes)")
    ap.add_argument("--cnn-epochs", type=int, nargs="+", default=None, help="default: params.yaml's classifier.cnn_epochs")
    ap.add_argument("--seeds", type=int, default=3, help="CNN seeds per release")
    ap.add_argument("--scratch", default=None, help="folder for the runs' models and samples (default: a temporary one, deleted)")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for the provenance")
    ap.add_argument("--out", default="benchmarks/results/proxy_tradeoff")
    args = ap.parse_args()
    if not args.variant and not args.release:
        raise SystemExit("nothing to do: give --variant and/or --release")
    started = datetime.datetime.now(datetime.timezone.utc)
    ws = Path(args.workspace).resolve()
    params_file = Path(args.params) if args.params else ws / "params.yaml"
    base = yaml.safe_load(params_file.read_text())
    check_public(base, params_file)
    variants = [parse_variant(v) for v in args.variant]
    tmp = tempfile.TemporaryDirectory(prefix="proxy_tradeoff_") if args.scratch is None else None
    scratch = Path(args.scratch or tmp.name).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    log = scratch / "stages.log"

    import torch

    from dpldm.config import load_section, with_overrides
    from dpldm.metrics import Augment
    from stages.classify import split_validation
    from stages.common import read_images

    private = ws / "data/private/images.parquet"
    ref = scratch / "reference"
    (scratch / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    if not (ref / "extractor").exists():  # the domain extractor of label consistency and fid_domain, on the proxy's train digits
        run_stage("reference", scratch / "params.yaml", ["--in", f"private={private}", "--out", f"extractor={ref / 'extractor'}",
                                                          "--out", f"metrics={ref / 'metrics.json'}", "--out", f"live={ref / 'live'}"], log)

    given = [parse_release(text) for text in args.release]
    overrides = dict(variants)
    releases = [(name, r, overrides.get(name, {}), path, {}) for name, r, path in given]  # (variant, repeat, overrides, samples, s)
    for name, over in variants:
        if any(g[0] == name for g in given):
            continue
        params = with_overrides(base, over)
        for r in range(args.repeats):
            d = scratch / f"{name}_{r}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            p = d / "params.yaml"
            secs = {"dp_finetune": run_stage("dp_finetune", p, [
                "--in", f"ldm={ws / 'models/ldm_public'}", "--in", f"latents={ws / 'data/latents/private.npz'}",
                "--out", f"model={d / 'ldm'}", "--out", f"ledger={d / 'ledger.json'}", "--state", f"checkpoint={d / 'checkpoint'}",
                "--out", f"live={d / 'live_dp'}"], log)}
            secs["sample"] = run_stage("sample", p, ["--in", f"ldm={d / 'ldm'}", "--in", f"ae={ws / 'models/ae'}",
                                                     "--out", f"samples={d / 'samples.parquet'}", "--out", f"grid={d / 'grid.png'}",
                                                     "--out", f"live={d / 'live_sample'}"], log)
            releases.append((name, r, over, d / "samples.parquet", secs))
            print(f"{name}/{r}: dp_finetune {secs['dp_finetune']:.0f} s, sample {secs['sample']:.0f} s", flush=True)

    clf = load_section(base, "classifier")
    torch.set_num_threads(load_section(base, "runtime").threads or torch.get_num_threads())
    augment = Augment.of(clf)
    test_x, test_y = load(private, "test", public_only=True)  # invariant 7: refused unless the proxy's set is public
    rows = []
    for name, r, over, path, secs in releases:
        d = scratch / f"fid_{name}_{r}"
        run_stage("score_fid", scratch / "params.yaml", [
            "--in", f"samples={path}", "--in", f"private={private}", "--in", f"extractor={ref / 'extractor'}",
            "--out", f"cache={d / 'cache'}", "--out", f"live={d / 'live'}"], log)
        fid = json.loads((d / "live" / "metrics.json").read_text())
        x, y, _ = read_images(path)
        k = int(max(y.max(), test_y.max())) + 1
        for n in args.samples:
            if n % k:
                raise SystemExit(f"--samples {n}: not a multiple of the {k} classes")
            keep = first_per_class(y, n // k)
            xt, yt, xv, yv = split_validation(x[keep], y[keep], fraction=clf.val_fraction, seed=0)
            for epochs in args.cnn_epochs or [clf.cnn_epochs]:
                accs, _, _, cnn_s = cnn_seeds(xt, yt, xv, yv, test_x, test_y, num_classes=k, epochs=epochs, clf=clf,
                                              augment=augment, seeds=args.seeds)
                rows.append({"variant": name, "repeat": r, "overrides": ",".join(f"{a}={b}" for a, b in over.items()) or "-",
                             "dp_finetune_s": secs.get("dp_finetune", float("nan")), "sample_s": secs.get("sample", float("nan")),
                             "label_consistency": fid["label_consistency"], "fid_domain": fid["fid_domain"],
                             "samples": n, "cnn_epochs": epochs, "cnn_accuracy": float(np.mean(accs)), "cnn_std": float(np.std(accs)),
                             "s_per_cnn": float(np.mean(cnn_s))})
                print(f"{name}/{r} {n} samples, {epochs} CNN epochs: {np.mean(accs):.4f} ± {np.std(accs):.4f}, "
                      f"label consistency {fid['label_consistency']:.3f}", flush=True)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(with_ext(out, ".csv"), index=False)
    g = df.groupby(["variant", "samples", "cnn_epochs"], sort=False)
    summary = g.agg(runs=("repeat", "nunique"), overrides=("overrides", "first"), dp_s=("dp_finetune_s", "mean"),
                    sample_s=("sample_s", "mean"), lc=("label_consistency", "mean"), fid=("fid_domain", "mean"),
                    acc=("cnn_accuracy", "mean"), acc_runs=("cnn_accuracy", lambda a: " / ".join(f"{100 * v:.1f}" for v in a)),
                    s_cnn=("s_per_cnn", "mean")).reset_index()
    fmt = lambda v, f: "-" if v != v else format(v, f)  # noqa: E731 (NaN: times not measured)
    lines = [provenance("proxy_tradeoff.py", None, started), "",
             "# Cheaper DP fine-tuning, fewer samples, fewer CNN epochs: their cost on the public proxy", "",
             f"Proxy workspace: its public models and its private set ({base['data']['private']['source']}, public). Each run: "
             f"dp_finetune and sample (this checkout's stages, OS noise), score_fid against the proxy's train digits, then "
             f"the downstream CNN (params.yaml's recipe, {args.seeds} seeds) on the first N samples per class, tested on the "
             f"proxy's {len(test_y)} real test digits. That day's `benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}.",
             "", "| variant | overrides | DP runs | samples | CNN epochs | CNN % (per run) | mean | label consistency | fid_domain | "
             "dp_finetune s | sample s | s per CNN |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
             *(f"| {r.variant} | {r.overrides} | {r.runs} | {r.samples} | {r.cnn_epochs} | {r.acc_runs} | **{100 * r.acc:.1f}** | "
               f"{r.lc:.3f} | {r.fid:.0f} | {fmt(r.dp_s, '.0f')} | {fmt(r.sample_s, '.0f')} | {r.s_cnn:.1f} |"
               for r in summary.itertuples())]
    write_table(with_ext(out, ".md"), lines)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
