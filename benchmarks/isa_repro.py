"""Does a trained model depend on the processor? pretrain_ae's own stage, run in fresh processes on the same public
set, natively and with PyTorch, oneDNN and MKL held to narrower x86 vector instruction sets (their documented
switches: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS). Each kernel family picks its code
path, and so its summation order, by instruction set; 438 AdamW steps amplify the last-bit differences.

    python benchmarks/isa_repro.py [--settings native avx2] [--repeats 1] [--work build/isa_repro] \\
        [--ldm] [--params params.yaml] [--out benchmarks/results/isa_repro.md] [--step-figure "0.46 s/step (date)"]

Run it in a workspace after ``dvc repro prepare_public`` (public data only). For each setting and repeat the table
gives the stage's held-out public PSNR and latent scale factor (full precision), a SHA-256 of the trained weights
(every tensor's bytes, in key order) and the wall seconds; with ``--ldm`` also the public LDM's (encode_public's and
pretrain_ldm's stages under the same setting): its held-out public loss and weights hash."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
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


def train(setting: str, folder: Path, public: str, params: str = "params.yaml", *, ldm: bool = False) -> dict:
    """pretrain_ae's stage in a fresh process under ``SETTINGS[setting]``: {psnr, scale, sha256, seconds}; with ``ldm``
    also encode_public's and pretrain_ldm's stages under the same setting: {ldm_loss, ldm_sha256, ldm_seconds}."""
    from public_ldm_variants import run_stage

    folder.mkdir(parents=True, exist_ok=True)
    stage = lambda name, *args: run_stage(name, Path(params), list(args), env=SETTINGS[setting])
    seconds = stage("pretrain_ae", "--in", f"public={public}", "--out", f"model={folder / 'ae'}",
                    "--out", f"grid={folder / 'reconstructions.png'}", "--out", f"live={folder / 'live'}")
    m = json.loads((folder / "live" / "metrics.json").read_text())
    out = {"psnr": m["test_psnr_db"], "scale": m["latent_scale_factor"], "sha256": weights_sha256(folder / "ae" / "model.pt"),
           "seconds": seconds}
    if ldm:
        ldm_seconds = stage("encode_public", "--in", f"images={public}", "--in", f"ae={folder / 'ae'}",
                            "--out", f"latents={folder / 'public.npz'}", "--out", f"live={folder / 'live_encode'}")
        ldm_seconds += stage("pretrain_ldm", "--in", f"latents={folder / 'public.npz'}", "--out", f"model={folder / 'ldm'}",
                             "--state", f"checkpoint={folder / 'ldm_checkpoint'}", "--out", f"live={folder / 'live_ldm'}")
        out.update(ldm_loss=json.loads((folder / "live_ldm" / "metrics.json").read_text())["test_loss_ema"],
                   ldm_sha256=weights_sha256(folder / "ldm" / "model.pt"), ldm_seconds=ldm_seconds)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=sorted(SETTINGS))
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (a repeat shows a run-to-run difference)")
    ap.add_argument("--public-data", default="data/public/images.parquet")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--work", default="build/isa_repro", help="the trained AEs (not in git)")
    ap.add_argument("--out", default="benchmarks/results/isa_repro.md")
    ap.add_argument("--ldm", action="store_true",
                    help="also encode the public set and pretrain the public LDM under each setting (its held-out loss)")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure")
    args = ap.parse_args(argv)
    if not Path(args.public_data).exists():
        raise SystemExit(f"--public-data {args.public_data}: not found; run `dvc repro prepare_public` first")
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for r in range(1, args.repeats + 1):
        for s in args.settings:
            res = train(s, Path(args.work) / f"{s}_{r}", args.public_data, args.params, ldm=args.ldm)
            print(s, r, res, flush=True)
            rows.append((s, r, res))
    env = lambda s: " ".join(f"{k}={v}" for k, v in SETTINGS[s].items()) or "(none)"
    lines = [provenance("isa_repro.py", argv, started), "",
             f"pretrain_ae's stage at {args.params}'s `ae` section, {args.public_data}; that day's "
             f"benchmarks/pretrain_step.py: {args.step_figure or 'not given'}.", "",
             "| setting | environment | run | held-out public PSNR (dB) | latent scale factor | AE weights SHA-256 (first 16) | s |"
             + (" LDM held-out public loss (EMA) | LDM weights SHA-256 (first 16) | encode + LDM s |" if args.ldm else ""),
             "|---|---|---:|---:|---:|---|---:|" + ("---:|---|---:|" if args.ldm else "")]
    lines += [f"| {s} | `{env(s)}` | {r} | {res['psnr']:.12f} | {res['scale']:.12f} | `{res['sha256'][:16]}` | {res['seconds']:.0f} |"
              + (f" {res['ldm_loss']:.12f} | `{res['ldm_sha256'][:16]}` | {res['ldm_seconds']:.0f} |" if args.ldm else "")
              for s, r, res in rows]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
