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
from pathlib import Path

import numpy as np

from dpldm.config import load_section, to_dict
from dpldm.finetune import Finetuning, new_ledger, plan_finetune
from dpldm.ledger import ATTEMPTS, complete, new_attempt, uses_of
from dpldm.privacy import PrivacyConfigError
from stages.artifacts import load_ldm
from stages.common import (Checkpoint, ConfigError, file_sha, live, load_latents, npz_rows, progress, read_json, save_model, setup_runtime,
                           stage_main, write_json)

INPUTS = ("ldm", "latents")
OUTPUTS = ("model", "ledger", "live")
STATE = ("checkpoint",)  # resumable state: not a DVC output (stages.common.parse_args)


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg = load_section(params, "finetune")
    device, seed = setup_runtime(params, stage="dp_finetune")
    model, ldm_cfg, _ = load_ldm(inputs["ldm"])
    # --- validation before any private data is touched: N comes from the file header ---------------
    n = npz_rows(inputs["latents"], "train_labels")
    try:
        selection, plan = plan_finetune(model, cfg, n=n)
    except PrivacyConfigError as err:
        raise ConfigError(str(err)) from None
    ledger = new_ledger(cfg, selection, plan, n=n)
    print(f"dp_finetune: training {selection.describe()}")
    if plan:
        print(f"dp_finetune: noise multiplier {plan.noise_multiplier:.4f} for eps={cfg.epsilon}, delta={cfg.delta:g}, "
              f"q={plan.sample_rate:.5f}, {plan.steps} steps ({cfg.accountant})")

    # --- private data from here on -------------------------------------------------------------
    z, y = load_latents(inputs["latents"])
    ft = Finetuning(model, selection, plan, cfg, ldm_cfg, z=z, y=y, seed=seed, device=device)

    # --- resume, or a new attempt (which spends budget) -----------------------------------------------
    ckdir = Path(outputs["checkpoint"])
    attempts_path = ckdir / ATTEMPTS
    attempts = read_json(attempts_path) if attempts_path.exists() else []
    data_sha = file_sha(inputs["latents"])
    ckpt = Checkpoint(ckdir / "state.pt", {"finetune": to_dict(cfg), "ldm_sha": file_sha(Path(inputs["ldm"]) / "model.pt"),
                                           "data_sha": data_sha, "seed": seed})
    state = ckpt.load()
    if state is not None:
        ft.load_state_dict(state)
        attempts[-1]["resumed_at_epoch"] = attempts[-1].get("resumed_at_epoch", []) + [ft.epoch]
        print(f"dp_finetune: resuming at epoch {ft.epoch} of {ft.epochs} ({ft.steps} steps spent so far)")
    else:
        for a in attempts:
            if a["status"] == "lost":
                print(f"dp_finetune: counting a lost attempt ({a['where']}) at its target epsilon {a['target_epsilon']}")
        attempts.append(new_attempt(ledger, data_sha=data_sha))
        if cfg.mode != "none" and uses_of(attempts, data_sha) > 1:
            print("dp_finetune: a new attempt on private data that earlier attempts already used; the ledger's "
                  "epsilon_spent_all_attempts adds them up (a retry spends budget)")
    write_json(attempts_path, attempts)
    stop_after = int(os.environ.get("DPLDM_STOP_AFTER_EPOCH", "0"))  # simulate a crash (tests)

    # --- training -------------------------------------------------------------------------------
    with live(outputs["live"]) as lv:
        bar = progress(total=ft.total_steps, initial=ft.steps, desc="dp_finetune")
        while ft.epoch < ft.epochs:
            losses = ft.run_epoch(on_step=lambda: bar.update(1))
            lv.log_metric("train/loss", float(np.mean(losses)) if losses else float("nan"))
            if plan:
                lv.log_metric("train/epsilon_spent", ft.epsilon())
            lv.next_step()
            ckpt.save(ft.state_dict())
            if stop_after and ft.epoch >= stop_after and ft.epoch < ft.epochs:
                raise SystemExit(f"dp_finetune: stopped after epoch {ft.epoch} (DPLDM_STOP_AFTER_EPOCH)")
        bar.close()
        adapter = ft.finish()
        eps = ft.epsilon()
        if eps is not None and eps > cfg.epsilon + 1e-9:
            raise RuntimeError(f"accountant reports epsilon {eps:.4f} above the target {cfg.epsilon}: refusing to release")
        if plan and ft.steps != plan.steps:
            raise RuntimeError(f"dp_finetune took {ft.steps} steps, the plan {plan.steps}: refusing to release")
        complete(ledger, attempts, data_sha=data_sha, epsilon_spent=eps, steps=ft.steps)
        if ledger.epsilon_spent_all_attempts == math.inf:
            print("dp_finetune: WARNING a non-private or seeded-noise attempt trained on this private data: no epsilon "
                  "holds for releases made from it (epsilon_spent_all_attempts = inf)")
        elif ledger.epsilon_spent_all_attempts is not None and ledger.attempt > 1:
            print(f"dp_finetune: WARNING attempt {ledger.attempt} on the same private data; together they spent "
                  f"up to eps={ledger.epsilon_spent_all_attempts:.4g} (basic composition)")
        print(f"dp_finetune: {ledger.release}")
    ckpt.mark_completed()
    write_json(attempts_path, attempts)
    write_json(outputs["ledger"], ledger.to_dict())
    # mode lora: model.pt holds the merged weights (what sample loads); adapter.pt the adapters alone
    # (a small release, applied to the base model whose hash it names)
    lora_files = {"adapter": "adapter.pt", "base_model": str(Path(inputs["ldm"]) / "model.pt"),
                  "base_model_sha": ckpt.run_key["ldm_sha"]} if adapter is not None else None
    save_model(outputs["model"], state_dict=model.cpu().state_dict(), config=to_dict(ldm_cfg),
               extra={"latent_shape": list(z.shape[1:]), "finetune": to_dict(cfg), "trainable": list(selection.names),
                      "release": ledger.release_stamp, **({"lora": lora_files} if lora_files else {})},
               tensors={"adapter.pt": adapter} if adapter is not None else None)
    return {"epsilon_spent": ledger.epsilon_spent, "noise_multiplier": ledger.noise_multiplier, "steps": ledger.steps,
            "trainable_params": ledger.trainable_params}


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, state=STATE, argv=argv)


if __name__ == "__main__":
    main()
