"""What an LDM shape change (e.g. the number of attention heads) costs in each stage that runs the UNet:
the pretraining step, the DP fine-tuning step and sampling, timed side by side in fresh processes, alternated
(A B A B ...) so that a drifting machine affects every variant alike. Untrained models and random latents:
timing only; what a shape is worth is judged elsewhere (``public_ldm_variants.py``, ``finetune_sweep.py``).

    python benchmarks/ldm_shape_ab.py --variant heads8:ldm.attention_head_dim=8 \\
        --variant heads1:ldm.attention_head_dim=1 [--rounds 2] [--step-figure "..."] \\
        [--out benchmarks/results/ldm_heads_ab.md]

Per variant and round, one process times: ``pretrain_ldm``'s step (``dpldm.diffusion.eps_loss``, AdamW) at
params.yaml's ``ldm.batch_size``; ``dp_finetune``'s logical step (``benchmarks/dp_step.py``'s measurement: the
stage's own ``dpldm.finetune`` loop at params.yaml's finetune settings); and ``sample``'s sampler
(``dpldm.sampling.generate``: params.yaml's solver, steps and batch, with the AE decode) for ``--samples`` digits."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pretrain_ldm_sweep import overrides_label, parse_variant  # noqa: E402
from provenance import provenance, write_table  # noqa: E402

KINDS = ("pretrain step (s)", "DP step (s)", "sampling (s per 1k)")


def one(overrides: dict, steps: int, samples: int) -> dict:
    """The three timings for one variant, in this process."""
    import torch
    import yaml

    import dp_step
    from pretrain_step import ldm_step_fn, timed
    from dpldm.config import load_all, with_overrides
    from dpldm.diffusion import Sampler, make_scheduler
    from dpldm.models import build_autoencoder, build_ldm, latent_shape
    from dpldm.sampling import generate

    c = load_all(with_overrides(yaml.safe_load(Path("params.yaml").read_text()), overrides))
    torch.set_num_threads(c["runtime"].threads or torch.get_num_threads())
    torch.manual_seed(0)
    pub, ldm_cfg = c["data"].public, c["ldm"]
    lat = latent_shape(c["ae"], image_size=pub.image_size)
    ldm = build_ldm(ldm_cfg, latent_channels=lat[0], latent_size=lat[1])
    sched = make_scheduler(ldm_cfg)
    pretrain = timed(ldm_step_fn(ldm, ldm_cfg.batch_size, latent=lat, scheduler=sched, num_classes=ldm_cfg.num_classes),
                     steps)

    ae = build_autoencoder(c["ae"], channels=pub.channels, image_size=pub.image_size).eval()
    ldm.eval()
    s = c["sample"]
    labels = torch.arange(samples) % ldm_cfg.num_classes
    kwargs = dict(sampler=Sampler.of(s), batch_size=s.batch_size, ldm_cfg=ldm_cfg, latent_shape=lat, latent_scale=1.0,
                  scheduler=sched, show_progress=False)
    generate(ldm, ae, labels[: s.batch_size], generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up
    t0 = time.perf_counter()
    generate(ldm, ae, labels, generator=torch.Generator().manual_seed(1), **kwargs)
    sampling = (time.perf_counter() - t0) / samples * 1000
    dp = dp_step.one(dict(overrides), steps)["s_per_step"]
    return dict(zip(KINDS, (pretrain, dp, sampling), strict=True))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,... (keys of params.yaml)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant, alternated")
    ap.add_argument("--steps", type=int, default=4, help="timed pretraining and DP steps per process (after one warm-up)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for the provenance")
    ap.add_argument("--out", default="benchmarks/results/ldm_shape_ab.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # JSON overrides: time one variant in this process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one), args.steps, args.samples)))
        return
    if len(args.variant) < 2:
        ap.error("give at least two --variant name:key=value,... (the first is the baseline of the ratios)")
    started = datetime.datetime.now(datetime.timezone.utc)
    variants = [parse_variant(v) for v in args.variant]
    times = {name: {k: [] for k in KINDS} for name, _ in variants}
    for _ in range(args.rounds):
        for name, over in variants:
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(over), "--steps", str(args.steps),
                                  "--samples", str(args.samples)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"ldm_shape_ab: variant {name} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            for k in KINDS:
                times[name][k].append(r[k])
            print(name, {k: round(v, 3) for k, v in r.items()}, flush=True)
    base = variants[0][0]
    lines = [provenance("ldm_shape_ab.py", None, started), "",
             f"{platform.machine()}, {args.rounds} fresh processes per variant, alternated; {args.steps} timed steps each "
             f"(after one warm-up); sampling {args.samples} digits with params.yaml's sampler and the AE decode; untrained "
             f"models, random latents. That day's `benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}.", "",
             "| variant | overrides | " + " | ".join(f"{k}, each process" for k in KINDS) + " | "
             + " | ".join(f"{k.split(' (')[0]} vs {base}" for k in KINDS) + " |",
             "|---|---|" + "---|" * len(KINDS) + "---:|" * len(KINDS)]
    for name, over in variants:
        t = times[name]
        cells = [", ".join(f"{v:.2f}" for v in t[k]) for k in KINDS]
        ratios = [f"{statistics.mean(times[base][k]) / statistics.mean(t[k]):.2f}x" for k in KINDS]
        lines.append(f"| {name} | `{overrides_label(over)}` | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", f"Ratios: the mean time of `{base}` over the variant's (above 1: the variant is faster)."]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
