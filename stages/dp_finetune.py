"""Stage dp_finetune: DP-SGD on the *private* latents, training only the selected parameters
(attention modules i..j plus the class embedder) of the public LDM.

Order matters for privacy: every setting is validated and the noise is calibrated from N (read from
the file header) before a single private latent is loaded. The ledger (epsilon from the accountant,
delta, noise, steps, ...) is written every run; an interrupted run resumes from its last epoch with
the accountant's history (and fresh secret noise), and a fresh start on the same data is counted as
another attempt. A non-private or seeded-noise attempt on the same data voids the ledger's total.

The DP noise and the Poisson sampling are secret (``dpldm.privacy.secret_generator``): their seeds are
never in params, logs or checkpoints. ``finetune.reproducible_noise: true`` seeds them from
``runtime.seeds.dp_finetune`` instead (tests, debugging), and every output then says "not a DP release"."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, TensorDataset

from dpldm.config import load_section, to_dict
from dpldm.diffusion import eps_loss, make_scheduler
from dpldm.models import attention_modules
from dpldm.privacy import (PrivacyConfigError, dp_generators, make_private, plan_dp, select_trainable, steps_per_epoch_of,
                           train_epoch, validate_plan_inputs)
from stages.common import (ConfigError, atomic_path, file_sha, live, npz_rows, progress, read_json, save_model, seed_of,
                           setup_runtime,
                           stage_main, write_json)
from stages.artifacts import load_ldm

INPUTS = ("ldm", "latents")
OUTPUTS = ("model", "ledger", "checkpoint", "live")


SECRET_NOISE = ("secret: torch.Generator seeded from os.urandom (64 bits, not a CSPRNG stream), opacus secure_mode "
                "noise (4 draws / 2); never stored")
SEEDED_NOISE = "seeded from runtime.seeds.dp_finetune (finetune.reproducible_noise): NOT A DP RELEASE"


def release_of(cfg) -> dict:
    """What the fine-tuned model is, stamped on the ledger, the model and everything made from it."""
    if cfg.mode == "none":
        return {"dp_release": False, "release": "public model (finetune.mode: none; no private data used)"}
    if not cfg.private:
        return {"dp_release": False, "release": "not a DP release: non-private fine-tuning on private data (finetune.private: false)"}
    if cfg.reproducible_noise:
        return {"dp_release": False, "release": "not a DP release: seeded noise (finetune.reproducible_noise: true)"}
    return {"dp_release": True, "release": f"DP release (epsilon {cfg.epsilon:g}, delta {cfg.delta:g})"}


def total_epsilon(attempts: list[dict], data_sha: str) -> float:
    """Basic composition over every attempt on the same private data. An attempt that trained on it
    without DP, or with seeded noise, voids the guarantee: the total is then infinite."""
    total = 0.0
    for a in attempts:
        if a["data_sha"] != data_sha or not a.get("uses_private_data", True):
            continue
        # records from before secret noise have no "dp": their noise was seeded from params, so no epsilon held
        if not a.get("dp", False):
            return math.inf
        total += a["epsilon_spent"] if a["status"] == "completed" else a["target_epsilon"]
    return total


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "finetune")
    seed = seed_of(params, "dp_finetune")
    device = setup_runtime(params, seed=seed)
    model, ldm_cfg, _ = load_ldm(inputs["ldm"])
    # --- validation before any private data is touched ---------------------------------------
    try:
        names = select_trainable(model, mode=cfg.mode, layers=cfg.layers, train_embedder=cfg.train_embedder)
        n = npz_rows(inputs["latents"], "train_labels")
        if cfg.private and cfg.mode != "none":
            plan = plan_dp(cfg, n=n)
        else:
            validate_plan_inputs(cfg, n=n)
            plan = None
    except PrivacyConfigError as err:
        raise ConfigError(str(err)) from None
    mods = attention_modules(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    k = cfg.noise_multiplicity
    steps_per_epoch = plan.steps_per_epoch if plan else steps_per_epoch_of(n, cfg.batch_size)
    private = bool(cfg.private and cfg.mode != "none")
    ledger = {
        **release_of(cfg), "private": private,
        "noise_source": (SEEDED_NOISE if cfg.reproducible_noise else SECRET_NOISE) if private else None,
        "mode": cfg.mode, "layers": list(cfg.layers),
        "train_embedder": cfg.train_embedder, "selected_attention_modules": [m.name for m in mods[cfg.layers[0] - 1:cfg.layers[1]]]
        if cfg.mode == "attention" else ([m.name for m in mods] if cfg.mode == "full" else []),
        "trainable_params": n_trainable, "total_params": n_total, "trainable_share": n_trainable / n_total,
        "N": n, "K": k, "expected_batch_size": cfg.batch_size, "physical_batch_size": cfg.physical_batch_size,
        "epochs": cfg.epochs if cfg.mode != "none" else 0, "clip_norm": cfg.clip_norm, "accountant": cfg.accountant,
        "delta": cfg.delta, "target_epsilon": cfg.epsilon if private else None,
        "noise_multiplier": plan.noise_multiplier if plan else 0.0, "sample_rate": plan.sample_rate if plan else 1.0 / steps_per_epoch,
    }
    print(f"dp_finetune: training {len(names)} tensors, {n_trainable:,} of {n_total:,} parameters "
          f"({100 * n_trainable / n_total:.1f}%): {ledger['selected_attention_modules']}"
          + (" + class_embedder" if cfg.train_embedder and cfg.mode == "attention" else ""))
    if plan:
        print(f"dp_finetune: noise multiplier {plan.noise_multiplier:.4f} for eps={cfg.epsilon}, delta={cfg.delta:g}, "
              f"q={plan.sample_rate:.5f}, {plan.steps} steps ({cfg.accountant})")

    # --- private data from here on -------------------------------------------------------------
    data = np.load(inputs["latents"])
    z, y = torch.from_numpy(data["train_latents"]), torch.from_numpy(data["train_labels"]).long()
    scheduler = make_scheduler(ldm_cfg)
    model.to(device)
    ema = EMAModel(trainable, decay=cfg.ema_decay)  # before opacus wraps the model (no hooks on the copy)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0) if trainable else None
    # The (t, noise) draws of the diffusion loss are part of the per-example gradient, not of the DP
    # mechanism: they may be seeded. The DP noise and the Poisson sampling are secret unless asked.
    g_loss = torch.Generator().manual_seed(seed + 1)
    # (without DP, the sampling generator only shuffles: seeded)
    g_data, g_dp = dp_generators(reproducible=cfg.reproducible_noise or not plan, seed=seed, device=device)
    accountant = None
    if plan:
        pt = make_private(model, opt, TensorDataset(z, y), plan=plan, max_grad_norm=cfg.clip_norm, noise_multiplicity=k,
                          sampling_generator=g_data, noise_generator=g_dp)
        net, opt, loader, accountant = pt.model, pt.optimizer, pt.data_loader, pt.accountant
    else:
        net = model
        loader = DataLoader(TensorDataset(z, y), batch_size=cfg.batch_size, shuffle=True, generator=g_data)

    # --- resume or a new attempt ------------------------------------------------------------------
    ckdir = Path(outputs["checkpoint"])
    ckdir.mkdir(parents=True, exist_ok=True)
    ckpt, attempts_path = ckdir / "state.pt", ckdir / "attempts.json"
    attempts = read_json(attempts_path) if attempts_path.exists() else []
    data_sha = file_sha(inputs["latents"])
    run_key = {"finetune": to_dict(cfg), "ldm_sha": file_sha(Path(inputs["ldm"]) / "model.pt"), "data_sha": data_sha, "seed": seed}
    start_epoch, steps = 0, 0
    state = torch.load(ckpt, map_location="cpu", weights_only=False) if ckpt.exists() else None
    if state is not None and state["run_key"] == run_key and not state.get("completed"):
        model.load_state_dict(state["model"])
        if opt is not None:
            opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        if accountant is not None:
            accountant.load_state_dict(state["accountant"])
        g_loss.set_state(state["g_loss"])
        if state.get("g_data") is not None:  # only seeded runs store them; secret ones draw fresh secret seeds
            g_data.set_state(state["g_data"])
            g_dp.set_state(state["g_dp"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, steps = state["epoch"], state["steps"]
        attempts[-1]["resumed_at_epoch"] = attempts[-1].get("resumed_at_epoch", []) + [start_epoch]
        print(f"dp_finetune: resuming at epoch {start_epoch} of {cfg.epochs} ({steps} steps spent so far)")
    else:
        attempts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "data_sha": data_sha, "private": private,
                         "dp": ledger["dp_release"], "uses_private_data": cfg.mode != "none",
                         "target_epsilon": cfg.epsilon if private else None, "status": "started"})
        if cfg.mode != "none" and len([a for a in attempts if a["data_sha"] == data_sha and a.get("uses_private_data", True)]) > 1:
            print("dp_finetune: a new attempt on private data that earlier attempts already used; the ledger's "
                  "epsilon_spent_all_attempts adds them up (a retry spends budget)")
    write_json(attempts_path, attempts)
    stop_after = int(os.environ.get("DPLDM_STOP_AFTER_EPOCH", "0"))  # simulate a crash (tests)

    # --- training -------------------------------------------------------------------------------
    epochs = ledger["epochs"]
    with live(outputs["live"]) as lv:
        bar = progress(total=epochs * steps_per_epoch, initial=steps, desc="dp_finetune")
        for epoch in range(start_epoch, epochs):
            net.train()

            def on_step():
                nonlocal steps
                ema.step(trainable)
                steps += 1
                bar.update(1)

            losses = train_epoch(loader=loader, optimizer=opt, trainable=trainable, private=plan is not None,
                                 physical_batch_size=cfg.physical_batch_size, on_step=on_step,
                                 loss_fn=lambda zb, yb: eps_loss(net, zb.to(device), yb.to(device), scheduler=scheduler,
                                                                 generator=g_loss, k=k).mean())
            eps_now = accountant.get_epsilon(delta=cfg.delta) if accountant else None
            lv.log_metric("train/loss", float(np.mean(losses)) if losses else float("nan"))
            if eps_now is not None:
                lv.log_metric("train/epsilon_spent", eps_now)
            lv.next_step()
            with atomic_path(ckpt) as tmp:
                torch.save({"run_key": run_key, "epoch": epoch + 1, "steps": steps, "model": model.state_dict(),
                            "opt": opt.state_dict() if opt is not None else None, "ema": ema.state_dict(),
                            "accountant": accountant.state_dict() if accountant else None, "g_loss": g_loss.get_state(),
                            # the DP generators' states only when seeded: secret ones are never written anywhere
                            "g_data": g_data.get_state() if cfg.reproducible_noise else None,
                            "g_dp": g_dp.get_state() if cfg.reproducible_noise else None,
                            "torch_rng": torch.get_rng_state()}, tmp)
            if stop_after and epoch + 1 >= stop_after and epoch + 1 < epochs:
                raise SystemExit(f"dp_finetune: stopped after epoch {epoch + 1} (DPLDM_STOP_AFTER_EPOCH)")
        bar.close()
        if trainable:
            ema.copy_to(trainable)
        eps = float(accountant.get_epsilon(delta=cfg.delta)) if accountant else None
        if eps is not None and eps > cfg.epsilon + 1e-9:
            raise RuntimeError(f"accountant reports epsilon {eps:.4f} above the target {cfg.epsilon}: refusing to release")
        attempts[-1].update(status="completed", epsilon_spent=eps, steps=steps)
        if plan and steps != plan.steps:
            raise RuntimeError(f"dp_finetune took {steps} steps, the plan {plan.steps}: refusing to release")
        ledger.update(epsilon_spent=eps, steps=steps,
                      attempt=len([a for a in attempts if a["data_sha"] == data_sha and a.get("uses_private_data", True)])
                      if cfg.mode != "none" else 0,
                      epsilon_spent_all_attempts=total_epsilon(attempts, data_sha) if cfg.mode != "none" else None,
                      resumed_at_epoch=attempts[-1].get("resumed_at_epoch", []))
        if ledger["epsilon_spent_all_attempts"] == math.inf:
            print("dp_finetune: WARNING a non-private or seeded-noise attempt trained on this private data: no epsilon "
                  "holds for releases made from it (epsilon_spent_all_attempts = inf)")
        elif ledger["epsilon_spent_all_attempts"] is not None and ledger["attempt"] > 1:
            print(f"dp_finetune: WARNING attempt {ledger['attempt']} on the same private data; together they spent "
                  f"up to eps={ledger['epsilon_spent_all_attempts']:.4g} (basic composition)")
        print(f"dp_finetune: {ledger['release']}")
    torch.save({"run_key": run_key, "completed": True}, ckpt)
    write_json(attempts_path, attempts)
    write_json(outputs["ledger"], ledger)
    save_model(outputs["model"], state_dict=model.cpu().state_dict(), config=to_dict(ldm_cfg),
               extra={"latent_shape": list(z.shape[1:]), "finetune": to_dict(cfg), "trainable": names,
                      "release": {k: ledger[k] for k in ("dp_release", "release", "epsilon_spent", "delta")}})
    return {k: ledger[k] for k in ("epsilon_spent", "noise_multiplier", "steps", "trainable_params")}


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
