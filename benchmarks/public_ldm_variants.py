"""Pretraining variants of the public LDM, judged by what their samples are worth, on public data only
(invariant 7): the held-out public loss (``pretrain_ldm_sweep.py``) does not say whether the samples carry their
class or help a classifier; this does.

    python benchmarks/public_ldm_variants.py --variant default: --variant lr4e-3:ldm.lr=0.004 \\
        [--seeds 3] [--per-class 200] [--work build/public_ldm_variants] \\
        [--out benchmarks/results/public_ldm_variants] [--step-figure "LDM 0.43 s/step (date)"]

Run it in a workspace after ``dvc repro pretrain_ldm`` (it needs the public AE, latents and images). For each
variant (``name:key=value,...``, the keys of params.yaml):
1. params.yaml with the overrides is written to ``WORK/NAME/params.yaml``, and pretrain_ldm's own stage
   (``python -m stages.pretrain_ldm``) trains the public model into ``WORK/NAME/ldm``. A folder that already holds
   a model trained with the same ``ldm`` section is reused, so a second invocation only adds variants.
2. ``sampling_sweep.py --public``'s criterion scores it at the sampler of params.yaml's ``sample`` section, over
   ``--seeds`` sampling seeds (each its own samples and TSTR CNN): label consistency, fid_domain, k-NN precision
   and recall against the held-out public test split, and the accuracy there of a CNN trained on the samples.
No private or proxy file is read. Writes ``OUT.md`` (mean ± std per variant) and ``OUT.csv`` (one row per seed)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpldm.config import load_section, with_overrides  # noqa: E402
from dpldm.diffusion import make_scheduler  # noqa: E402
from stages.artifacts import load_autoencoder, load_ldm  # noqa: E402
from pretrain_ldm_sweep import overrides_label, parse_variant, write_rows  # noqa: E402
from provenance import provenance, with_ext, write_table  # noqa: E402
from sampling_sweep import PublicJudge, public_cells, public_header, public_rows  # noqa: E402


def run_stage(module: str, params: Path, args: list[str], *, env: dict | None = None) -> float:
    """Runs ``python -m stages.MODULE --params PARAMS ARGS`` in a subprocess (no progress bars; ``env`` added to this
    process's environment); its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"stages.{module}", "--params", str(params), *args], check=True,
                   env={**os.environ, "DPLDM_PROGRESS": "0", **(env or {})})
    return time.perf_counter() - t0


def trained_before(name: str, model: Path, marker: Path, section: str, params: dict) -> dict | None:
    """The record in ``marker`` when ``model`` is there and was trained with the same ``params[section]``, else None."""
    if marker.exists() and (model / "config.json").exists():
        done = json.loads(marker.read_text())
        if done.get(section) == params[section]:
            print(f"{name}: reusing {model} (trained with the same {section} section)", flush=True)
            return done
    return None


def train(name: str, params: dict, work: Path, *, latents: str) -> tuple[Path, float | None]:
    """(model folder, training seconds: measured now, or as recorded when reused). Trains with the stage itself,
    in a subprocess."""
    folder = work / name
    model, marker = folder / "ldm", folder / "trained.json"
    if (done := trained_before(name, model, marker, "ldm", params)) is not None:
        return model, done.get("train_s")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds = run_stage("pretrain_ldm", folder / "params.yaml",
                        ["--in", f"latents={latents}", "--out", f"model={model}", "--state", f"checkpoint={folder / 'checkpoint'}",
                         "--out", f"live={folder / 'live'}"])
    marker.write_text(json.dumps({"ldm": params["ldm"], "train_s": seconds}))
    return model, seconds


def start(args) -> tuple[dict, datetime.datetime]:
    """(params.yaml, start time): also sets ``args.tstr`` and ``args.threads`` (runtime.threads) for the judge."""
    args.tstr = True
    started = datetime.datetime.now(datetime.timezone.utc)
    params = yaml.safe_load(Path("params.yaml").read_text())
    args.threads = load_section(params, "runtime").threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    return params, started


def judge_setup(params: dict, public_data: str, seed: int) -> tuple[str, PublicJudge]:
    """(the sampler setting of params.yaml's ``sample`` section, the public judge on ``public_data``)."""
    sample = load_section(params, "sample")
    setting = (f"eta={sample.eta},steps={sample.steps},w={sample.guidance_scale},precision={sample.precision},"
               f"solver={sample.solver},spacing={sample.spacing}")
    judge = PublicJudge(public_data, clf=load_section(params, "classifier"), fcfg=load_section(params, "fid"),
                        num_classes=load_section(params, "ldm").num_classes, seed=seed)
    return setting, judge


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True, help="name:key=value,... (name: alone = the defaults)")
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds per variant")
    ap.add_argument("--seed", type=int, default=0, help="first sampling seed; also the domain CNN's seed")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--latents", default="data/latents/public.npz")
    ap.add_argument("--ae", default="models/ae")
    ap.add_argument("--public-data", default="data/public/images.parquet")
    ap.add_argument("--work", default="build/public_ldm_variants", help="models and params per variant (not in git)")
    ap.add_argument("--out", default="benchmarks/results/public_ldm_variants")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for the provenance")
    args = ap.parse_args()
    params, started = start(args)
    ae, ae_conf = load_autoencoder(args.ae)
    setting, judge = judge_setup(params, args.public_data, args.seed)
    rows, table = [], []
    for text in args.variant:
        name, over = parse_variant(text)
        folder, seconds = train(name, with_overrides(params, over), Path(args.work), latents=args.latents)
        model, ldm_cfg, conf = load_ldm(folder)
        model.eval()
        live = folder.parent / "live" / "metrics.json"
        if live.exists():
            heldout = json.loads(live.read_text()).get("test_loss_ema", float("nan"))
        else:  # a pre-placed model (trained by `dvc repro`) may come without the stage's live folder
            heldout = float("nan")
            print(f"{name}: no {live}: held-out loss not recorded (nan); copy the stage's dvclive folder there to keep it",
                  flush=True)
        mine = public_rows(model, ae, judge, [setting], ldm_cfg=ldm_cfg, conf=conf, ae_conf=ae_conf,
                           scheduler=make_scheduler(ldm_cfg), args=args)
        for r in mine:
            r.update(variant=name, overrides=overrides_label(over), heldout_loss=heldout, train_s=seconds)
        rows += mine
        table.append(f"| {name} | `{overrides_label(over)}` | {heldout:.4f} | {seconds or float('nan'):.0f} | "
                     + " | ".join(public_cells(mine)) + " |")
        write_rows(Path(args.out), rows)
    lines = [provenance("public_ldm_variants.py", None, started), "",
             "# Public LDM pretraining variants, judged by their samples on the public set", "",
             f"{args.threads} torch threads; sampler `{setting}` (params.yaml); {args.per_class} samples per class; sampling "
             f"seeds {args.seed}..{args.seed + args.seeds - 1} (mean ± std); domain CNN test accuracy "
             f"{judge.test_accuracy:.3f}. That day's `benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}.", "",
             *public_header(("variant", "overrides"), ("held-out public loss (EMA)", "training s")), *table]
    write_table(with_ext(args.out, ".md"), lines)


if __name__ == "__main__":
    main()
