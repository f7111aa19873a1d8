"""The privacy audit (dpldm/audit.py) catches the bugs it is for, on a tiny model: with the noise forced
to 0, with clipping disabled, or with the K copies of an example clipped separately, its epsilon lower
bound exceeds the claimed epsilon; with the correct mechanism it stays below."""
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from dpldm.audit import GradientCanaries, epsilon_lower_bound, guess_and_bound, membership_auc, p_value
from dpldm.privacy import KAveragedDPOptimizer, epsilon_of, make_private, plan_dp, train_epoch
from helpers import cfg

EPSILON, DELTA, K = 2.0, 1e-5, 8  # K = 8 as in the public DP-LoRA code that clips copies separately


class NoClipping(KAveragedDPOptimizer):
    """Mutation: per-example gradients summed unclipped (the noise still scales with the clip norm)."""

    def clip_and_accumulate(self):
        c, self.max_grad_norm = self.max_grad_norm, 1e30
        try:
            super().clip_and_accumulate()
        finally:
            self.max_grad_norm = c


def tiny_audit(mutation: str, *, seed: int = 0) -> tuple[float, dict]:
    torch.manual_seed(seed)
    n = 1000
    ft = cfg("finetune", batch_size=100, physical_batch_size=100, epochs=10, epsilon=EPSILON, delta=DELTA, clip_norm=1.0,
             noise_multiplicity=K, accountant="prv")
    plan = plan_dp(ft, n=n)
    model = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)  # else each bias coordinate has a systematic gradient that masks its canary
    x, y = torch.randn(n, 64), 0.01 * torch.randn(n, 64)  # small real gradients: the canaries dominate their coordinates
    run_plan = dataclasses.replace(plan, noise_multiplier=0.0) if mutation == "no_noise" else plan
    pt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), TensorDataset(x, y), plan=run_plan,
                      max_grad_norm=ft.clip_norm, noise_multiplicity=1 if mutation == "separate_copies" else K,
                      sampling_generator=torch.Generator().manual_seed(seed + 1),
                      noise_generator=torch.Generator().manual_seed(seed + 2),  # seeded: a deterministic test
                      optimizer_cls=NoClipping if mutation == "no_clip" else KAveragedDPOptimizer)
    canaries = GradientCanaries(list(model.parameters()), m=1000, sample_rate=plan.sample_rate, k=K,
                                raw_norm=10 * ft.clip_norm, generator=torch.Generator().manual_seed(seed))
    pt.optimizer.canaries = canaries
    for _ in range(plan.epochs):
        train_epoch(loader=pt.data_loader, optimizer=pt.optimizer, trainable=list(model.parameters()), private=True,
                    physical_batch_size=ft.physical_batch_size,
                    loss_fn=lambda xb, yb: torch.nn.functional.mse_loss(pt.model(xb.repeat_interleave(K, 0)),
                                                                        yb.repeat_interleave(K, 0)))
    # the claim is what the ledger says: the accountant's epsilon of the planned noise, rate and steps
    claimed = epsilon_of(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                         delta=DELTA, accountant="prv")
    return claimed, canaries.result(k_pos=100, k_neg=100, delta=DELTA)


@pytest.mark.parametrize("mutation", ["no_noise", "no_clip", "separate_copies"])
def test_audit_catches_a_broken_mechanism(mutation):
    claimed, res = tiny_audit(mutation)
    assert claimed == pytest.approx(EPSILON, rel=0.02)
    assert res["epsilon_lower_bound"] > claimed, res


def test_audit_of_the_correct_mechanism_stays_below_the_claim():
    claimed, res = tiny_audit("none")
    assert res["guesses"] == 200 and res["abstentions"] == 800 and res["steps_observed"] == 100
    assert res["correct"] > 100  # the canaries are visible: better than chance, yet
    assert res["epsilon_lower_bound"] < claimed, res


def test_bound_properties():
    # chance-level guessing proves nothing; perfect guessing is capped by the number of guesses
    assert epsilon_lower_bound(m=1000, r=200, v=100, delta=0) == 0.0
    perfect = epsilon_lower_bound(m=1000, r=200, v=200, delta=0)
    assert 0.05 == pytest.approx(p_value(m=1000, r=200, v=200, epsilon=perfect, delta=0), rel=1e-3)
    assert perfect == pytest.approx(np.log(0.05 ** (1 / 200) / (1 - 0.05 ** (1 / 200))), rel=1e-4)
    assert epsilon_lower_bound(m=1000, r=200, v=200, delta=1e-3) < perfect  # delta weakens the bound
    assert epsilon_lower_bound(m=1000, r=200, v=180, delta=0) < perfect


def test_guesses_count_top_and_bottom():
    included = np.array([True, True, False, False, True, False])
    scores = np.array([5.0, 4.0, -3.0, -2.0, 0.0, 1.0])
    res = guess_and_bound(scores, included, k_pos=2, k_neg=2, delta=0)
    assert (res["guesses"], res["correct"], res["abstentions"]) == (4, 4, 2)


def test_membership_auc():
    rng = np.random.default_rng(0)
    same = membership_auc(rng.normal(size=2000), rng.normal(size=2000))
    assert abs(same["membership_auc"] - 0.5) < 0.05
    apart = membership_auc(rng.normal(3, 1, size=2000), rng.normal(size=2000))
    assert apart["membership_auc"] > 0.95 and apart["membership_tpr_at_0.01_fpr"] > 0.5


def test_balanced_subset_matches_the_class_mix_whatever_the_storage_order():
    from dpldm.audit import balanced_subset

    stored_by_class = np.repeat(np.arange(10), 400)  # as the private train split is stored
    idx = balanced_subset(stored_by_class, 1000, seed=0)
    assert len(idx) == len(set(idx.tolist())) == 1000
    assert np.bincount(stored_by_class[idx]).tolist() == [100] * 10  # not the first 1,000 (classes 0-2)
    small = balanced_subset(np.array([0, 0, 0, 1]), 3, seed=0)
    assert sorted(np.bincount(np.array([0, 0, 0, 1])[small]).tolist()) == [1, 2]


def test_the_audit_is_opt_in_and_when_off_reads_no_private_data_and_loads_no_torch(tmp_path):
    """The default (audit.enabled false) records that the audit did not run and how to run it, without
    touching its inputs (here they do not exist) or importing torch; the tiny pipeline runs it on."""
    import json
    import subprocess
    import sys

    import yaml

    from helpers import ROOT, env

    assert yaml.safe_load((ROOT / "params.yaml").read_text())["audit"]["enabled"] is False
    assert yaml.safe_load((ROOT / "tests/tiny_params.yaml").read_text())["audit"]["enabled"] is True
    code = ("import sys; from stages.audit import main; main(['--in', 'ldm=no/ldm', '--in', 'latents=no/private.npz', "
            f"'--in', 'released=no/released', '--out', 'live={tmp_path / 'live'}']); assert 'torch' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((tmp_path / "live/metrics.json").read_text())
    assert metrics == {"audit": "off (audit.enabled: false): run it with `dvc exp run -S audit.enabled=true audit`"}
