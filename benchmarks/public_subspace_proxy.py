"""The noisy DP gradient projected onto the top-k subspace of *public* per-example gradients (PDP-SGD, Zhou et al.
ICLR 2021; the projection half of GEP, Yu et al. ICLR 2021), judged on the public proxy only (invariant 7).

Every DP step of dp_finetune's own loop (``dpldm.finetune``) releases the clipped, summed per-example gradients
plus Gaussian noise in all d = 442,272 trainable coordinates. The projection keeps

    g' = V^T V g + residual * (g - V^T V g)

where V (k x d, orthonormal rows) spans the top-k eigenvectors of the second moment of unit-normed per-example
gradients of the same loss on ``examples`` public latents (the public set's train split, encode_public's output),
re-drawn every ``refresh`` DP steps at the current parameters. V depends on public data and on parameters that
are already DP outputs, so the projection is post-processing: no privacy cost. It keeps k / d of the noise's
energy and the share of the private signal that lies in the public subspace. ``residual`` 1 is plain DP-SGD;
since Adam is scale-free, ``residual`` a < 1 is the same as scaling the public directions up by 1 / a.

``mix`` > 0 (with or without the projection) adds public gradients to the released sum instead: the mean of
``mix_examples`` unit-normed public per-example gradients, drawn afresh at every step, times mix x B x C, as if mix x B
public examples had joined the batch (DOPE-SGD's public examples in the batch, Nasr et al. 2023, without their noise).
Public gradients added after the noise are post-processing too.

Also reported, at the pretrained model: the share of the proxy train set's mean unit gradient (the direction
every clipped per-example gradient pulls to) that the first basis captures, against that of other public examples.

    python scripts/apply_profile.py benchmarks/profiles/public_proxy.yaml && make repro   # in a copy
    python benchmarks/public_subspace_proxy.py --variant dp-sgd: --variant k64:rank=64,examples=256,refresh=8 \\
        [--variant k128-lr:rank=128,examples=512,refresh=8,finetune.lr=0.01] [--out benchmarks/results/public_subspace_proxy]

A variant is ``name:key=value,...``: rank, examples, refresh, residual, mix, mix_examples, and keys of params.yaml. The DP noise is
seeded (``finetune.reproducible_noise``), as in ``finetune_sweep.py``: nothing here is a DP release."""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import yaml

from dpldm.config import load_all
from dpldm.diffusion import eps_loss
from dpldm.finetune import Finetuning
from stages.common import load_latents

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_sweep import check_public, run_variant as run_dp_variant  # noqa: E402
from pretrain_ldm_sweep import load_splits, overrides_label, parse_variant, write_rows  # noqa: E402
from provenance import provenance, with_ext, write_table  # noqa: E402

PROJECTION_KEYS = {"rank": 0, "examples": 256, "refresh": 8, "residual": 0.0, "mix": 0.0, "mix_examples": 64}


def unit_gradients(ft: Finetuning, z: torch.Tensor, y: torch.Tensor, generator: torch.Generator, chunk: int = 250) -> torch.Tensor:
    """[m, d] per-example gradients of the fine-tuning loss (K draws averaged, as the DP step forms them) of the
    trainable parameters, each scaled to norm 1 (the DP step clips them all). Read off opacus' per-sample hooks;
    the parameters' ``grad`` / ``grad_sample`` are cleared before and after."""
    params = ft.selection.params
    rows = []
    for i in range(0, len(z), chunk):
        for p in params:
            p.grad_sample, p.grad = None, None
        eps_loss(ft.net, z[i:i + chunk], y[i:i + chunk], scheduler=ft.scheduler, generator=generator, k=ft.cfg.noise_multiplicity,
                 stratified=ft.cfg.stratified_t, t_range=ft.cfg.t_range).mean().backward()
        g = torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params], 1)
        rows.append(g / g.norm(dim=1, keepdim=True).clamp_min(1e-12))
    for p in params:
        p.grad_sample, p.grad = None, None
    return torch.cat(rows)


def top_basis(g: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [rank, d] with orthonormal rows, eigenvalues) of the top-``rank`` eigenvectors of g^T g, through the
    m x m Gram matrix (m << d)."""
    lam, u = torch.linalg.eigh((g @ g.T).double())
    lam, u = lam.flip(0)[:rank], u.flip(1)[:, :rank]
    return (u.T.float() @ g) / lam.clamp_min(1e-12).sqrt().float()[:, None], lam


def captured(v: torch.Tensor, x: torch.Tensor) -> float:
    """Share of the energy of vector ``x`` in the row space of ``v``."""
    return float((v @ x).norm() ** 2 / x.norm().clamp_min(1e-30) ** 2)


def run_variant(params: dict, over: dict, proj: dict, ldm_dir: str, z, y, zt, yt, zp, yp, seed: int) -> dict:
    """``finetune_sweep.run_variant``'s DP run with the projection and / or the public mix attached to its optimizer."""
    rank, m, refresh, residual = int(proj["rank"]), int(proj["examples"]), int(proj["refresh"]), float(proj["residual"])
    mix, n_mix = float(proj["mix"]), int(proj["mix_examples"])
    g_loss, g_pick = torch.Generator().manual_seed(seed + 7), torch.Generator().manual_seed(seed + 11)
    state = {"v": None, "shares": [], "basis_s": 0.0, "mix_s": 0.0, "first": {}, "noise_kept": 1.0}

    def attach(ft: Finetuning):
        def refresh_basis():
            t = time.perf_counter()
            pick = torch.randperm(len(zp), generator=g_pick)[:m]
            g = unit_gradients(ft, zp[pick], yp[pick], g_loss)
            state["v"], lam = top_basis(g, rank)
            state["shares"].append(float(lam.sum()) / m)  # share of the public rows' own energy the basis keeps
            state["basis_s"] += time.perf_counter() - t

        if rank > 0:
            refresh_basis()
            v = state["v"]
            held = torch.randperm(len(zp), generator=torch.Generator().manual_seed(seed + 13))[:m]
            state["first"] = {"proxy_mean_captured": captured(v, unit_gradients(ft, z[:m], y[:m], g_loss).mean(0)),
                              "public_mean_captured": captured(v, unit_gradients(ft, zp[held], yp[held], g_loss).mean(0))}
            state["noise_kept"] = rank / ft.selection.trainable_params
            add_noise = ft.optimizer.add_noise

            def projected_add_noise(self):
                add_noise()  # p.grad = clipped sum + noise
                g = torch.cat([p.grad.reshape(-1) for p in self.params])
                inside = state["v"].T @ (state["v"] @ g)
                g = inside + residual * (g - inside)
                at = 0
                for p in self.params:
                    p.grad = g[at:at + p.numel()].view_as(p).clone()
                    at += p.numel()
            ft.optimizer.add_noise = types.MethodType(projected_add_noise, ft.optimizer)
        if mix > 0:
            add_noise_before_mix = ft.optimizer.add_noise
            scale = mix * ft.optimizer.expected_batch_size * ft.cfg.clip_norm

            def mixed_add_noise(self):
                add_noise_before_mix()  # p.grad = clipped sum + noise (projected, with rank > 0)
                t = time.perf_counter()
                noisy, samples = [p.grad for p in self.params], [p.grad_sample for p in self.params]  # opacus reads both after
                pick = torch.randperm(len(zp), generator=g_pick)[:n_mix]
                u = unit_gradients(ft, zp[pick], yp[pick], g_loss).mean(0)  # clears grad / grad_sample
                at = 0
                for p, g, gs in zip(self.params, noisy, samples, strict=True):
                    p.grad, p.grad_sample = g + scale * u[at:at + p.numel()].view_as(p), gs
                    at += p.numel()
                state["mix_s"] += time.perf_counter() - t
            ft.optimizer.add_noise = types.MethodType(mixed_add_noise, ft.optimizer)

        def each_step():
            if rank > 0 and refresh and ft.steps % refresh == 0 and ft.steps < ft.total_steps:
                refresh_basis()
        return each_step

    r = run_dp_variant(params, over, ldm_dir, z, y, zt, yt, seed, attach=attach)
    return {**r, "rank": rank, "examples": m, "refresh": refresh, "residual": residual, "mix": mix, "mix_examples": n_mix,
            "mix_s": state["mix_s"], "public_rows_kept": float(np.mean(state["shares"])) if state["shares"] else float("nan"),
            "proxy_mean_captured": state["first"].get("proxy_mean_captured", float("nan")),
            "public_mean_captured": state["first"].get("public_mean_captured", float("nan")),
            "noise_kept": state["noise_kept"], "basis_s": state["basis_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ldm", default="models/ldm_public", help="pretrain_ldm's output (the public LDM)")
    ap.add_argument("--latents", default="data/latents/private.npz", help="the proxy's latents (encode_private's output)")
    ap.add_argument("--public-latents", default="data/latents/public.npz", help="encode_public's output: the basis' examples")
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--repeats", type=int, default=1, help="runs per variant, each with its own noise seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/public_subspace_proxy")
    ap.add_argument("--step-figure", default="", help="that day's benchmarks/pretrain_step.py figure, for the provenance")
    args = ap.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    params = yaml.safe_load(Path("params.yaml").read_text())
    source = check_public(params)
    torch.set_num_threads(load_all(params)["runtime"].threads or torch.get_num_threads())
    z, y, zt, yt = load_splits(args.latents)
    zp, yp = load_latents(args.public_latents)
    rows = []
    for text in args.variant:
        name, given = parse_variant(text)
        unknown = [k for k in given if "." not in k and k not in PROJECTION_KEYS]
        if unknown:
            raise SystemExit(f"--variant {text!r}: unknown key(s) {unknown}; use {sorted(PROJECTION_KEYS)} or params.yaml keys")
        proj = {k: given.get(k, d) for k, d in PROJECTION_KEYS.items()}
        over = {k: v for k, v in given.items() if "." in k}
        for rep in range(args.repeats):
            r = {"variant": name, "overrides": overrides_label(given), "repeat": rep,
                 **run_variant(params, over, proj, args.ldm, z, y, zt, yt, zp, yp, args.seed + 1000 * rep)}
            rows.append(r)
            print({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    out = Path(args.out)
    write_rows(out, rows)
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)

    def mean(rs, key, fmt):
        return format(float(np.mean([x[key] for x in rs])), fmt)

    def proj_label(r):
        label = f"{r['rank']} / {r['examples']} / {r['refresh']} / {r['residual']:g}" if r["rank"] else "off"
        return label + (f"; public mix {r['mix']:g} x {r['mix_examples']} examples" if r["mix"] else "")

    lines = [provenance("public_subspace_proxy.py", None, started), "",
             "# The noisy DP gradient projected onto a public-gradient subspace, judged on a public proxy's held-out latents", "",
             f"Proxy: `data.private.source: {source}`, {len(z)} train / {len(zt)} held-out latents; basis from the public set's "
             f"{len(zp)} train latents; {torch.get_num_threads()} torch threads, seeded DP noise (not releases), {args.repeats} run(s) "
             f"per variant. That day's `benchmarks/pretrain_step.py`: {args.step_figure or 'not given'}. Captured shares are at the "
             "pretrained model: the share of the mean unit per-example gradient that the first basis spans.", "",
             "| variant | settings | epsilon | lr | rank k / examples / refresh (steps) / residual; public mix | noise energy kept | "
             "held-out loss (EMA), mean (std) | by quarter of [0, T) (t low to high) | proxy mean captured | public mean captured | "
             "basis / mix time (s) | wall (s) |",
             "|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, rs in by.items():
        h = np.array([r["heldout_loss"] for r in rs])
        r = rs[0]
        lines.append(f"| {name} | `{r['overrides']}` | {r['epsilon']:.2f} | {r['lr']:g} | "
                     f"{proj_label(r)} | {r['noise_kept']:.2g} | "
                     f"{h.mean():.4f} ({h.std():.4f}) | {' / '.join(mean(rs, f'heldout_loss_t{q}', '.4f') for q in range(4))} | "
                     f"{mean(rs, 'proxy_mean_captured', '.3f')} | {mean(rs, 'public_mean_captured', '.3f')} | "
                     f"{mean(rs, 'basis_s', '.0f')} / {mean(rs, 'mix_s', '.0f')} | {mean(rs, 'wall_s', '.0f')} |")
    write_table(with_ext(out, ".md"), lines)


if __name__ == "__main__":
    main()
