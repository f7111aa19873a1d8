"""Does a trained model depend on the processor? pretrain_ae's own stage, run in fresh processes on the same public
set, natively and with PyTorch, oneDNN and MKL held to narrower x86 vector instruction sets (their documented
switches: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS). Each kernel family picks its code
path, and so its summation order, by instruction set; 876 AdamW steps amplify the last-bit differences.

    python benchmarks/isa_repro.py [--settings native avx2] [--repeats 1] [--work build/isa_repro] \\
        [--params params.yaml] [--out benchmarks/results/isa_repro.md] [--step-figure "0.46 s/step (date)"]

Run it in a workspace after ``dvc repro prepare_public`` (public data only). For each setting and repeat the table
gives the stage's held-out public PSNR and latent scale factor (full precision), a SHA-256 of the trained weights
(every tensor's bytes, in key order) and the wall seconds."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_table  # noqa: E402

SETTINGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def weights_sha256(model_pt: Path) -> str:
    """SHA-256 over every tensor of a saved model (keys sorted, nested dicts walked): equal hashes, equal weights."""
    import torch

    h = hashlib.sha256()

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(f"{prefix}/{k}", obj[k])
        elif isinstance(obj, torch.Tensor):
            h.update(prefix.encode())
            h.update(obj.detach().cpu().contiguous().numpy().tobytes())

    walk("", torch.load(model_pt, map_location="cpu", weights_only=True))
    return h.hexdigest()


def train(setting: str, folder: Path, public: str, params: str = "params.yaml") -> dict:
    """pretrain_ae's stage in a fresh process under ``SETTINGS[setting]``: {psnr, scale, sha256, seconds}."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DPLDM_PROGRESS": "0", **SETTINGS[setting]}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.pretrain_ae", "--params", params, "--in", f"public={public}",
                    "--out", f"model={folder / 'ae'}", "--out", f"grid={folder / 'reconstructions.png'}",
                    "--out", f"live={folder / 'live'}"], check=True, env=env)
    seconds = time.perf_counter() - t0
    m = json.loads((folder / "live" / "metrics.json").read_text())
    return {"psnr": m["test_psnr_db"], "scale": m["latent_scale_factor"], "sha256": weights_sha256(folder / "ae" / "model.pt"),
            "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=sorted(SETTINGS))
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (a repeat shows a run-to-run difference)")
    ap.add_argument("--public-data", default="data/public/images.parquet")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--work", default="build/isa_repro", help="the trained AEs (not in git)")
    ap.add_argument("--out", default="benchmarks/results/isa_repro.md")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure")
    args = ap.parse_args(argv)
    if not Path(args.public_data).exists():
        raise SystemExit(f"--public-data {args.public_data}: not found; run `dvc repro prepare_public` first")
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for r in range(1, args.repeats + 1):
        for s in args.settings:
            res = train(s, Path(args.work) / f"{s}_{r}", args.public_data, args.params)
            print(s, r, res, flush=True)
            rows.append((s, r, res))
    env = lambda s: " ".join(f"{k}={v}" for k, v in SETTINGS[s].items()) or "(none)"
    lines = [provenance("isa_repro.py", argv, started), "",
             f"pretrain_ae's stage at {args.params}'s `ae` section, {args.public_data}; that day's "
             f"benchmarks/pretrain_step.py: {args.step_figure or 'not given'}.", "",
             "| setting | environment | run | held-out public PSNR (dB) | latent scale factor | weights SHA-256 (first 16) | s |",
             "|---|---|---:|---:|---:|---|---:|"]
    lines += [f"| {s} | `{env(s)}` | {r} | {res['psnr']:.12f} | {res['scale']:.12f} | `{res['sha256'][:16]}` | {res['seconds']:.0f} |"
              for s, r, res in rows]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
