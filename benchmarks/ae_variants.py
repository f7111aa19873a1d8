"""Autoencoder pretraining variants on public data only (invariant 7): held-out public PSNR and training time.

    python benchmarks/ae_variants.py --variant default: --variant e1b32:ae.epochs=1,ae.batch_size=32 \\
        [--work build/ae_variants] [--out benchmarks/results/ae_variants] [--step-figure "0.85 s/step (date)"] \\
        [--ldm]

Run it in a workspace after ``dvc repro prepare_public``. For each variant (``name:key=value,...``, the keys of
params.yaml), params.yaml with the overrides is written to ``WORK/NAME/params.yaml`` and pretrain_ae's own stage
(``python -m stages.pretrain_ae``) trains the public AE into ``WORK/NAME/ae``; its held-out public reconstruction
(PSNR, MSE) and latent scale factor come from the stage's own metrics. A folder that already holds an AE trained with
the same ``ae`` section is reused.

With ``--ldm`` each AE is also judged by what it is worth downstream, on public data only: encode_public's stage
encodes the public set with it, pretrain_ldm's stage trains the default public LDM on those latents, and
``public_ldm_variants.py``'s judge scores that model's samples (label consistency, fid_domain, k-NN precision and
recall, the accuracy on the held-out public split of a CNN trained on the samples). Writes ``OUT.md`` and ``OUT.csv``."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpldm.config import load_section, with_overrides  # noqa: E402
from dpldm.diffusion import make_scheduler  # noqa: E402
from pretrain_ldm_sweep import overrides_label, parse_variant, write_rows  # noqa: E402
from provenance import provenance, with_ext, write_table  # noqa: E402
from public_ldm_variants import judge_setup, run_stage, start, trained_before, train as train_ldm  # noqa: E402
from sampling_sweep import public_cells, public_header, public_rows  # noqa: E402
from stages.artifacts import load_autoencoder, load_ldm  # noqa: E402


def train_ae(name: str, params: dict, work: Path, *, public: str) -> tuple[Path, dict]:
    """(AE folder, {train_s, test_psnr_db, test_mse, latent_scale_factor}); reused when trained with the same ae section.
    A retrained AE drops the variant's latents and LDM, which were made from the AE it replaces."""
    folder = work / name
    model, marker = folder / "ae", folder / "ae_trained.json"
    if (done := trained_before(name, model, marker, "ae", params)) is not None:
        return model, done["metrics"]
    (folder / "public.npz").unlink(missing_ok=True)
    shutil.rmtree(work / f"ldm_{name}", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds = run_stage("pretrain_ae", folder / "params.yaml",
                        ["--in", f"public={public}", "--out", f"model={model}", "--out", f"grid={folder / 'reconstructions.png'}",
                         "--out", f"live={folder / 'live_ae'}"])
    m = json.loads((folder / "live_ae" / "metrics.json").read_text())
    metrics = {"train_s": seconds, **{k: m[k] for k in ("test_psnr_db", "test_mse", "latent_scale_factor")}}
    marker.write_text(json.dumps({"ae": params["ae"], "metrics": metrics}))
    return model, metrics


def downstream(name: str, params: dict, work: Path, ae: Path, *, public: str, judge, setting: str, args) -> list[dict]:
    """Encodes the public set with ``ae``, pretrains the default LDM on it and scores its samples on public data."""
    folder = work / name
    latents = folder / "public.npz"
    if not latents.exists():
        run_stage("encode_public", folder / "params.yaml",
                  ["--in", f"images={public}", "--in", f"ae={ae}", "--out", f"latents={latents}",
                   "--out", f"live={folder / 'live_encode'}"])
    ldm_folder, ldm_s = train_ldm("ldm_" + name, params, work, latents=str(latents))
    model, ldm_cfg, conf = load_ldm(ldm_folder)
    model.eval()
    live = ldm_folder.parent / "live" / "metrics.json"
    heldout = json.loads(live.read_text()).get("test_loss_ema", float("nan")) if live.exists() else float("nan")
    ae_model, ae_conf = load_autoencoder(str(ae))
    rows = public_rows(model, ae_model, judge, [setting], ldm_cfg=ldm_cfg, conf=conf, ae_conf=ae_conf,
                       scheduler=make_scheduler(ldm_cfg), args=args)
    for r in rows:
        r.update(ldm_heldout_loss=heldout, ldm_train_s=ldm_s)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True, help="name:key=value,... (name: alone = the defaults)")
    ap.add_argument("--public-data", default="data/public/images.parquet")
    ap.add_argument("--work", default="build/ae_variants", help="models and params per variant (not in git)")
    ap.add_argument("--out", default="benchmarks/results/ae_variants")
    ap.add_argument("--ldm", action="store_true", help="also pretrain the default public LDM on each AE and judge its samples")
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds per variant (--ldm)")
    ap.add_argument("--seed", type=int, default=0, help="first sampling seed; also the domain CNN's seed (--ldm)")
    ap.add_argument("--per-class", type=int, default=200, help="samples per class (--ldm)")
    ap.add_argument("--batch-size", type=int, default=500, help="sampling batch (--ldm)")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for the provenance")
    args = ap.parse_args()
    params, started = start(args)
    work = Path(args.work)
    setting, judge = judge_setup(params, args.public_data, args.seed) if args.ldm else (None, None)
    rows, table = [], []
    for text in args.variant:
        name, over = parse_variant(text)
        p = with_overrides(params, over)
        cfg = load_section(p, "ae")
        ae, m = train_ae(name, p, work, public=args.public_data)
        row = {"variant": name, "overrides": overrides_label(over), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
               "lr": cfg.lr, **m}
        cells = (f"| {name} | `{overrides_label(over)}` | {cfg.epochs} x {cfg.batch_size} | {cfg.lr:g} | "
                 f"{m['test_psnr_db']:.2f} | {m['test_mse']:.5f} | {m['latent_scale_factor']:.3f} | {m['train_s']:.0f} |")
        if args.ldm:
            mine = downstream(name, p, work, ae, public=args.public_data, judge=judge, setting=setting, args=args)
            for r in mine:
                r.update(row)
            rows += mine
            cells += f" {mine[0]['ldm_heldout_loss']:.4f} | " + " | ".join(public_cells(mine)) + " |"
        else:
            rows.append(row)
        table.append(cells)
        write_rows(Path(args.out), rows)
    head = ("| variant | overrides | epochs x batch | lr | held-out public PSNR (dB) | MSE | latent scale | training s |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if args.ldm:
        ph = public_header((), ("LDM held-out public loss (EMA)",))
        head, rule = head + ph[0].lstrip("|"), rule + ph[1].lstrip("|")
    lines = [provenance("ae_variants.py", None, started), "",
             "# Public autoencoder variants: held-out public reconstruction" + (" and what their LDM's samples are worth"
                                                                               if args.ldm else ""), "",
             f"{args.threads} torch threads. That day's `benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}."
             + (f" Sampler `{setting}` (params.yaml); {args.per_class} samples per class; sampling seeds "
                f"{args.seed}..{args.seed + args.seeds - 1} (mean ± std); domain CNN test accuracy {judge.test_accuracy:.3f}."
                if args.ldm else ""), "", head, rule, *table]
    write_table(with_ext(args.out, ".md"), lines)


if __name__ == "__main__":
    main()
