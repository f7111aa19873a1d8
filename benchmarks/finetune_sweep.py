"""DP fine-tuning variants (batch size, learning rate, epochs, ...) judged on a *public proxy* only
(invariant 7): each variant runs dp_finetune's own loop (``dpldm.finetune``) from the pretrained LDM on the
proxy's train latents and reports the eps-loss of its EMA model on the proxy's held-out latents, with the
true labels and with the null class, the accountant's epsilon, the noise multiplier and the wall time.

    python scripts/apply_profile.py benchmarks/profiles/public_proxy.yaml && make repro   # in a copy
    python benchmarks/finetune_sweep.py --variant default: --variant q1/4:finetune.batch_size=350 \\
        [--ldm models/ldm_public] [--latents data/latents/private.npz] [--out benchmarks/results/finetune_sweep]

A variant is ``name:key=value,...`` (keys of params.yaml; ``extra=norms+io+temb`` also trains those parameter groups
beyond the DP selection, a benchmark-only probe: ``EXTRA_GROUPS``). The script refuses to run unless the workspace's
``data.private.source`` is a public set (the proxy): a choice read off the real private data would sit
outside the ledger. Its DP noise is seeded (``finetune.reproducible_noise``, one seed per repeat): nothing
it trains is a DP release, and the variants see the same noise streams, which makes them comparable."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from tqdm import tqdm

from dpldm.config import load_all, load_section, with_overrides
from dpldm.finetune import Finetuning, plan_finetune
from dpldm.privacy import Selection, dp_noise_variance
from dpldm.training import heldout_loss
from stages.artifacts import load_ldm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_ldm_sweep import load_splits, overrides_label, parse_variant, write_rows  # noqa: E402
from provenance import provenance, with_ext, write_table  # noqa: E402

PUBLIC_SOURCES = ("digits8x8", "fontdigits")  # bundled with scikit-learn / rendered from matplotlib's fonts
EXTRA_GROUPS = {  # parameter groups a variant may train beyond finetune's selection (qualified-name tests)
    "norms": lambda n: "norm" in n and ".attentions." not in n,  # the ResNet blocks' GroupNorms and the output norm
    "io": lambda n: n.startswith(("unet.conv_in.", "unet.conv_out.", "unet.conv_norm_out.")),
    "temb": lambda n: "time_emb" in n,  # the timestep MLP and each ResNet block's projection of it
}


def check_public(params: dict) -> str:
    source = params["data"]["private"]["source"]
    if source not in PUBLIC_SOURCES:
        raise SystemExit(f"data.private.source is {source!r}: this sweep tunes choices, so it runs only on a public proxy "
                         f"({', '.join(PUBLIC_SOURCES)}). Apply benchmarks/profiles/public_proxy.yaml in a copy of the repo "
                         f"and run `make repro` there first (invariant 7).")
    return source


def with_extra(model: torch.nn.Module, selection: Selection, groups: tuple[str, ...]) -> Selection:
    """``selection`` plus the parameters of ``EXTRA_GROUPS`` ``groups`` (unfrozen; named_parameters order)."""
    unknown = sorted(set(groups) - set(EXTRA_GROUPS))
    if unknown:
        raise SystemExit(f"extra={'+'.join(groups)}: unknown group(s) {unknown}; use {'+'.join(EXTRA_GROUPS)}")
    have = set(selection.names)
    pairs = [(n, p) for n, p in model.named_parameters() if n in have or any(EXTRA_GROUPS[g](n) for g in groups)]
    for _, p in pairs:
        p.requires_grad_(True)
    return dataclasses.replace(selection, names=tuple(n for n, _ in pairs), params=tuple(p for _, p in pairs))


def run_variant(params: dict, overrides: dict, ldm_dir: str, z, y, zt, yt, seed: int, extra: tuple[str, ...] = (),
                attach: Callable[[Finetuning], Callable[[], None]] | None = None) -> dict:
    """One seeded DP run of the variant and its held-out losses. ``attach(ft)``, if given, runs once the fine-tuning is
    built (before the clock starts) and returns a callback for every logical step (``public_subspace_proxy.py``)."""
    cfg = load_section(with_overrides(params, {**overrides, "finetune.reproducible_noise": True}), "finetune")
    model, ldm_cfg, _ = load_ldm(ldm_dir)
    selection, plan = plan_finetune(model, cfg, n=len(z))
    if extra:
        selection = with_extra(model, selection, extra)
    ft = Finetuning(model, selection, plan, cfg, ldm_cfg, z=z, y=y, seed=seed)
    each_step = attach(ft) if attach is not None else (lambda: None)
    t0 = time.perf_counter()
    last = []
    with tqdm(total=ft.total_steps, desc=str(overrides or "defaults"), mininterval=10) as bar:
        def on_step():
            bar.update()
            each_step()
        for _ in range(ft.epochs):
            last = ft.run_epoch(on_step=on_step)
    wall = time.perf_counter() - t0
    eps = ft.epsilon()
    v_ratio = second_moment_over_noise(ft)
    ft.finish()
    null = torch.full_like(yt, ldm_cfg.num_classes)
    true_loss = heldout_loss(model, zt, yt, cfg=ldm_cfg)
    T = ldm_cfg.num_train_timesteps
    quarters = {f"heldout_loss_t{q}": heldout_loss(model, zt, yt, cfg=ldm_cfg, t_range=(q * T // 4, (q + 1) * T // 4))
                for q in range(4)}  # the same loss with t in each quarter of [0, T): where a variant gains or loses
    return {"private": plan is not None, "epsilon": eps if eps is not None else float("inf"),
            "noise_multiplier": plan.noise_multiplier if plan else 0.0, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "epochs": ft.epochs, "steps": ft.steps, "K": cfg.noise_multiplicity, "trainable_params": selection.trainable_params,
            "train_loss_last_epoch": float(np.mean(last)) if last else float("nan"), "heldout_loss": true_loss,
            "heldout_loss_null": heldout_loss(model, zt, null, cfg=ldm_cfg), **quarters, "wall_s": wall,
            **{f"v_over_noise_p{q:02d}": x for q, x in zip((1, 50, 99), v_ratio, strict=True)}}


def second_moment_over_noise(ft: Finetuning) -> tuple[float, float, float]:
    """Quantiles (1%, 50%, 99%) over the trained coordinates of Adam's bias-corrected second moment divided by
    the DP noise's variance per coordinate, (sigma C / B)^2, at the end of the run: near 1 everywhere, the noise
    dominates every coordinate and DP-Adam divides them all by about the same number (it acts as SGD).
    NaN without DP (or without Adam's state)."""
    inner = getattr(ft.optimizer, "original_optimizer", None)
    if ft.plan is None or inner is None:
        return (float("nan"),) * 3
    phi = dp_noise_variance(ft.plan, clip_norm=ft.cfg.clip_norm)
    beta2 = inner.param_groups[0]["betas"][1]
    ratios = []
    for p in ft.selection.params:
        st = inner.state.get(p, {})
        if "exp_avg_sq" in st:
            ratios.append((st["exp_avg_sq"] / (1 - beta2 ** int(st["step"])) / phi).flatten())
    if not ratios:
        return (float("nan"),) * 3
    r = torch.cat(ratios).double().numpy()
    return tuple(float(x) for x in np.quantile(r, (0.01, 0.5, 0.99)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ldm", default="models/ldm_public", help="pretrain_ldm's output (the public LDM)")
    ap.add_argument("--latents", default="data/latents/private.npz", help="the proxy's latents (encode_private's output)")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--repeats", type=int, default=1, help="runs per variant, each with its own noise seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/finetune_sweep")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for the provenance")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    params = yaml.safe_load(Path("params.yaml").read_text())
    source = check_public(params)
    torch.set_num_threads(load_all(params)["runtime"].threads or torch.get_num_threads())
    z, y, zt, yt = load_splits(args.latents)
    rows = []
    for text in args.variant:
        name, given = parse_variant(text)
        extra = tuple(g for g in str(given.get("extra", "")).split("+") if g)
        over = {k: v for k, v in given.items() if k != "extra"}
        for rep in range(args.repeats):
            r = {"variant": name, "overrides": overrides_label(given), "repeat": rep,
                 **run_variant(params, over, args.ldm, z, y, zt, yt, args.seed + 1000 * rep, extra=extra)}
            rows.append(r)
            print({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    out = Path(args.out)
    write_rows(out, rows)
    df = {}
    for r in rows:
        df.setdefault(r["variant"], []).append(r)
    lines = [provenance("finetune_sweep.py", None, started), "",
             "# DP fine-tuning variants judged on a public proxy's held-out latents", "",
             f"Proxy: `data.private.source: {source}`, {len(z)} train / {len(zt)} held-out latents, {torch.get_num_threads()} torch "
             f"threads, seeded DP noise (not releases), {args.repeats} run(s) per variant. That day's "
             f"`benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}.", "",
             "| variant | overrides | trainable params | epsilon | sigma | batch x steps | held-out loss (EMA), mean (std) | "
             "with the null class | "
             "train loss, last epoch | held-out loss by quarter of [0, T) (t low to high) | "
             "Adam's second moment / noise variance, 1% / 50% / 99% | wall (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for name, rs in df.items():
        h = np.array([r["heldout_loss"] for r in rs])
        r = rs[0]
        lines.append(f"| {name} | `{r['overrides']}` | {r['trainable_params']:,} | {r['epsilon']:.2f} | {r['noise_multiplier']:.3f} | "
                     f"{r['batch_size']} x {r['steps']} | {h.mean():.4f} ({h.std():.4f}) | "
                     f"{np.mean([x['heldout_loss_null'] for x in rs]):.4f} | {np.mean([x['train_loss_last_epoch'] for x in rs]):.4f} | "
                     f"{' / '.join(format(np.mean([x['heldout_loss_t' + str(q)] for x in rs]), '.4f') for q in range(4))} | "
                     f"{' / '.join(format(np.mean([x[f'v_over_noise_p{q:02d}'] for x in rs]), '.2f') for q in (1, 50, 99))} | "
                     f"{np.mean([x['wall_s'] for x in rs]):.0f} |")
    write_table(with_ext(out, ".md"), lines)


if __name__ == "__main__":
    main()
