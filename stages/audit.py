"""Stage audit: try to break the epsilon we report (dpldm/audit.py).

1. White-box gradient canaries: a DP fine-tuning run with the real code (selection, K-averaging,
   clipping, secret noise, Poisson sampling, accountant) and dp_finetune's noise multiplier, rate, clip
   norm and K, for ``audit.epochs`` epochs, with ``audit.canaries`` Dirac canaries injected at row
   level. Reports the epsilon lower bound at ``audit.confidence`` against the accountant's epsilon of
   the audit run itself. The audit run's model is discarded; only canary counts leave the stage.
2. Black-box membership on the released model: each example's denoising loss over fixed (t, noise)
   draws; private train (members) against private test (non-members), AUC and TPR at 1% FPR.

The audit run trains on the private data: its published counts are a DP output of that run, at the
``audit_epsilon_claimed`` it reports (composition with the release applies if both are published).

Opt-in (``audit.enabled``, off by default): the default ``dvc repro`` runs the stage only to record that the
audit did not run, without loading torch or reading the private data (about 1-2 s, against 1-2 min);
``dvc exp run -S audit.enabled=true audit`` runs it (only this stage: its params changed)."""
from __future__ import annotations

import dataclasses

import numpy as np

from dpldm.config import AuditConfig, FinetuneConfig, load_section
from stages.common import ConfigError, live, load_latents, npz_rows, progress, setup_runtime, stage_main

# torch, diffusers and the audit code are imported where the audit runs: an audit that is off costs no imports
OFF = "off (audit.enabled: false): run it with `dvc exp run -S audit.enabled=true audit`"

INPUTS = ("ldm", "latents", "released")
OUTPUTS = ("live",)


def white_box(cfg: FinetuneConfig, acfg: AuditConfig, inputs: dict, *, seed: int, device) -> dict:
    import torch

    from dpldm.audit import GradientCanaries
    from dpldm.finetune import Finetuning, plan_finetune
    from dpldm.privacy import PrivacyConfigError, epsilon_of
    from stages.artifacts import load_ldm

    model, ldm_cfg, _ = load_ldm(inputs["ldm"])
    try:
        selection, plan = plan_finetune(model, cfg, n=npz_rows(inputs["latents"], "train_labels"))
    except PrivacyConfigError as err:
        raise ConfigError(str(err)) from None
    plan = dataclasses.replace(plan, epochs=acfg.epochs)  # the same sigma, rate and clip; fewer steps
    z, y = load_latents(inputs["latents"])
    ft = Finetuning(model, selection, plan, cfg, ldm_cfg, z=z, y=y, seed=seed, device=device)
    canaries = GradientCanaries(list(selection.params), m=acfg.canaries, sample_rate=plan.sample_rate, k=cfg.noise_multiplicity,
                                raw_norm=acfg.canary_norm_factor * cfg.clip_norm,
                                generator=torch.Generator().manual_seed(acfg.seed))
    ft.optimizer.canaries = canaries
    bar = progress(total=ft.total_steps, desc="audit (white-box)")
    while ft.epoch < ft.epochs:
        ft.run_epoch(on_step=lambda: bar.update(1))
    bar.close()
    claimed = epsilon_of(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                         delta=cfg.delta, accountant=cfg.accountant)
    res = canaries.result(k_pos=acfg.guesses_in, k_neg=acfg.guesses_out, delta=cfg.delta, confidence=acfg.confidence)
    out = {f"whitebox_{k}": v for k, v in res.items()}
    out.update(audit_epsilon_claimed=claimed, audit_noise_multiplier=plan.noise_multiplier, audit_steps=plan.steps,
               audit_K=cfg.noise_multiplicity, whitebox_bound_exceeds_claim=int(res["epsilon_lower_bound"] > claimed))
    return out


def black_box(acfg: AuditConfig, inputs: dict, *, device) -> dict:
    """Membership scores of the released model, and of the public model (never trained on either split)
    as the control: its AUC should be about 0.5; what the released model adds over it is membership."""
    import torch

    from dpldm.audit import balanced_subset, denoising_losses, membership_auc
    from dpldm.diffusion import make_scheduler
    from stages.artifacts import load_ldm

    data = np.load(inputs["latents"])
    split = {}
    for name in ("train", "test"):
        labels = data[f"{name}_labels"]
        idx = balanced_subset(labels, acfg.membership_examples, seed=acfg.seed)
        split[name] = (torch.from_numpy(data[f"{name}_latents"][idx]), torch.from_numpy(labels[idx]).long())
    out = {}
    for tag, folder in (("", inputs["released"]), ("_public_model", inputs["ldm"])):
        model, ldm_cfg, _ = load_ldm(folder)
        model.to(device).eval()
        scheduler = make_scheduler(ldm_cfg)
        scores = {name: -denoising_losses(model, z, y, scheduler=scheduler, draws=acfg.membership_draws, batch_size=250,
                                          seed=acfg.seed, device=device) for name, (z, y) in split.items()}
        out.update({f"{k}{tag}": v for k, v in membership_auc(scores["train"], scores["test"], fpr=0.01).items()})
    out.update(membership_members=len(split["train"][0]), membership_nonmembers=len(split["test"][0]))
    return out


def run(params: dict, inputs: dict, outputs: dict) -> dict:
    cfg, acfg = load_section(params, "finetune"), load_section(params, "audit")  # parsed once, before any work
    if not acfg.enabled:
        metrics = {"audit": OFF}
    elif not (cfg.private and cfg.mode != "none"):
        metrics = {"audit": f"not applicable: finetune.mode {cfg.mode}, finetune.private {cfg.private} (no DP mechanism)"}
    else:
        device, seed = setup_runtime(params, stage="dp_finetune")  # the audit run draws its (t, noise) as dp_finetune does
        metrics = {**white_box(cfg, acfg, inputs, seed=seed, device=device), **black_box(acfg, inputs, device=device)}
        if cfg.reproducible_noise:
            metrics["audit"] = "seeded noise (finetune.reproducible_noise): the mechanism audited is not a DP release"
        else:
            metrics["audit"] = ("BOUND EXCEEDS CLAIM: the mechanism is broken" if metrics["whitebox_bound_exceeds_claim"]
                                else "bound below the claim (consistent; a lower bound is not a certificate)")
    with live(outputs["live"]) as lv:
        for key, value in metrics.items():
            lv.log_metric(key, value, plot=False)
    return metrics


def main(argv=None) -> None:
    stage_main(run, inputs=INPUTS, outputs=OUTPUTS, argv=argv)


if __name__ == "__main__":
    main()
