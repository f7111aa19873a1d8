"""Seconds per logical step and peak memory of fine-tuning on the embedded default's shapes:
non-private attention-only, DP attention-only, DP full, at K=1 and K=4 (the README's DP table).

    python benchmarks/dp_step.py [--steps 6] [--out benchmarks/results/dp_step.md]

Uses the params.yaml LDM architecture and finetune batch sizes, random latents (timing only), and
the same code path as stages/dp_finetune.py (select_trainable, make_private, KAveragedDPOptimizer,
BatchMemoryManager). Each configuration runs in a fresh process so that peak RSS is its own."""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("non-private attention", "attention", False, 1), ("DP attention", "attention", True, 1),
           ("DP full", "full", True, 1), ("non-private attention", "attention", False, 4),
           ("DP attention", "attention", True, 4), ("DP full", "full", True, 4)]


def one(mode: str, private: bool, k: int, steps: int) -> dict:
    import torch
    import yaml
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader, TensorDataset

    from dpldm.config import load_all
    from dpldm.diffusion import eps_loss, make_scheduler
    from dpldm.models import build_ldm
    from dpldm.privacy import make_private, plan_dp, secret_generator, select_trainable

    cfgs = load_all(yaml.safe_load(Path("params.yaml").read_text()))
    torch.set_num_threads(cfgs["runtime"].threads or torch.get_num_threads())
    ldm, ft = cfgs["ldm"], cfgs["finetune"]
    n = 4000
    model = build_ldm(ldm, latent_channels=4, latent_size=8)
    select_trainable(model, mode=mode, layers=ft.layers, train_embedder=ft.train_embedder)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft.lr)
    ds = TensorDataset(torch.randn(n, 4, 8, 8), torch.randint(0, 10, (n,)))
    sched = make_scheduler(ldm)
    g = torch.Generator().manual_seed(0)
    if private:
        pt = make_private(model, opt, ds, plan=plan_dp(ft, n=n), max_grad_norm=ft.clip_norm, noise_multiplicity=k,
                          sampling_generator=secret_generator(), noise_generator=secret_generator())
        net, opt, loader = pt.model, pt.optimizer, pt.data_loader
    else:
        net, loader = model, DataLoader(ds, batch_size=ft.batch_size, shuffle=True, generator=g)
    times, done = [], 0
    while done < steps + 1:
        ctx = BatchMemoryManager(data_loader=loader, max_physical_batch_size=ft.physical_batch_size, optimizer=opt) if private else None
        batches = ctx.__enter__() if ctx else loader
        t0 = time.perf_counter()
        for zb, yb in batches:
            opt.zero_grad(set_to_none=True)
            eps_loss(net, zb, yb, scheduler=sched, generator=g, k=k).mean().backward()
            opt.step()
            if private and opt._is_last_step_skipped:
                continue
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            done += 1
            if done >= steps + 1:
                break
        if ctx:
            ctx.__exit__(None, None, None)
    return {"s_per_step": sum(times[1:]) / len(times[1:]), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results/dp_step.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        mode, private, k = args.one.split(",")
        print(json.dumps(one(mode, private == "1", int(k), args.steps)))
        return
    rows = []
    for label, mode, private, k in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--one", f"{mode},{int(private)},{k}"],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((label, k, r))
        print(label, k, r, flush=True)
    base = {k: r["s_per_step"] for label, k, r in rows if label == "non-private attention"}
    lines = [f"{platform.machine()}, {args.steps} timed logical steps per row (first step excluded), batch from params.yaml", "",
             "| configuration | K | trainable params | s / logical step | vs non-private attention (same K) | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {k} | {r['trainable']:,} | {r['s_per_step']:.2f} | {r['s_per_step'] / base[k]:.2f}x | {r['peak_rss_mib']:.0f} |"
              for label, k, r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
