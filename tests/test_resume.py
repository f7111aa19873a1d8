"""Interrupted runs resume to the same result as uninterrupted ones (stage functions called directly
on the tiny pipeline's files)."""
import json

import pytest
import torch
import yaml

from helpers import ROOT, run
from dpldm.ledger import Ledger

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream(tiny_pipeline):
    """The tiny repo with the stages up to encoding built."""
    import sys
    from pathlib import Path

    dvc = str(Path(sys.executable).parent / "dvc")
    run([dvc, "repro", "encode_private", "encode_public"], tiny_pipeline)
    return tiny_pipeline


def params_of(repo):
    return yaml.safe_load((repo / "params.yaml").read_text())


def test_pretrain_ldm_resume_equals_uninterrupted(upstream, tmp_path, monkeypatch):
    from stages import pretrain_ldm

    params = params_of(upstream)
    inputs = {"latents": str(upstream / "data/latents/public.npz")}
    outs = lambda d: {"model": str(tmp_path / d / "m"), "checkpoint": str(tmp_path / d / "ck"), "live": str(tmp_path / d / "live")}
    pretrain_ldm.run(params, inputs, outs("a"))
    monkeypatch.setenv("DPLDM_STOP_AFTER_STEP", "3")
    with pytest.raises(SystemExit):
        pretrain_ldm.run(params, inputs, outs("b"))
    assert not (tmp_path / "b" / "m").exists()
    monkeypatch.delenv("DPLDM_STOP_AFTER_STEP")
    pretrain_ldm.run(params, inputs, outs("b"))
    a = torch.load(tmp_path / "a/m/model.pt", weights_only=True)
    b = torch.load(tmp_path / "b/m/model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def finetune_io(upstream):
    import sys
    from pathlib import Path

    run([str(Path(sys.executable).parent / "dvc"), "repro", "pretrain_ldm"], upstream)
    return {"ldm": str(upstream / "models/ldm_public"), "latents": str(upstream / "data/latents/private.npz")}


def _outs(root, d, ck=None):
    return {"model": str(root / d / "m"), "ledger": str(root / d / "ledger.json"), "checkpoint": str(root / (ck or d) / "ck"),
            "live": str(root / d / "live")}


def _finetune(params, inputs, outs, **over):
    from stages import dp_finetune

    p = json.loads(json.dumps(params))
    p["finetune"].update(over)
    dp_finetune.run(p, inputs, outs)
    ledger = json.loads(open(outs["ledger"]).read())
    assert Ledger.from_dict(ledger).to_dict() == ledger  # the flow and the sweep read what the stage wrote
    return ledger, torch.load(outs["model"] + "/model.pt", weights_only=True)


def _interrupted_then_resumed(params, inputs, outs, monkeypatch, **over):
    monkeypatch.setenv("DPLDM_STOP_AFTER_EPOCH", "1")
    with pytest.raises(SystemExit):
        _finetune(params, inputs, outs, **over)
    monkeypatch.delenv("DPLDM_STOP_AFTER_EPOCH")
    return _finetune(params, inputs, outs, **over)


# a resumed run continues the lr schedule where it stopped, and DP-AdamBC's moments
@pytest.mark.parametrize("over", [{"cosine_decay": False}, {"cosine_decay": True}, {"adam_bc_floor": 0.5}])
def test_dp_finetune_resume_equals_uninterrupted_with_seeded_noise(upstream, finetune_io, tmp_path, monkeypatch, over):
    params = params_of(upstream)
    la, ma = _finetune(params, finetune_io, _outs(tmp_path, "a"), reproducible_noise=True, **over)
    lb, mb = _interrupted_then_resumed(params, finetune_io, _outs(tmp_path, "b"), monkeypatch, reproducible_noise=True, **over)
    assert lb["steps"] == la["steps"] and lb["epsilon_spent"] == pytest.approx(la["epsilon_spent"], rel=1e-9)
    assert lb["resumed_at_epoch"] == [1] and lb["attempt"] == 1
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6)
    # seeded noise is no DP release, and the ledger says so
    assert la["dp_release"] is False and "not a DP release" in la["release"] and "NOT A DP RELEASE" in la["noise_source"]
    assert la["epsilon_spent_all_attempts"] == float("inf")


def test_secret_noise_differs_between_runs_and_resume_and_retry_keep_the_ledger(upstream, finetune_io, tmp_path, monkeypatch):
    """Same params, same seeds: without the switch the DP noise and sampling are secret, so two runs differ.
    An interrupted run resumes the accountant (fresh secret noise, nothing of it stored); a retry on the
    same data is another attempt and its epsilon is added."""
    params = params_of(upstream)
    assert params["finetune"]["reproducible_noise"] is False  # the default
    la, ma = _finetune(params, finetune_io, _outs(tmp_path, "a"))
    lc, mc = _finetune(params, finetune_io, _outs(tmp_path, "c"))
    changed = [k for k in ma if not torch.equal(ma[k], mc[k])]
    assert changed, "two runs with the same params and seeds gave the same model: the noise is not secret"
    assert la["dp_release"] is True and la["release"].startswith("DP release") and "os.urandom" in la["noise_source"]
    state = torch.load(tmp_path / "a/ck/state.pt", weights_only=False)
    assert state.get("completed")  # nothing of the secret generators is left in a finished checkpoint
    lb, _ = _interrupted_then_resumed(params, finetune_io, _outs(tmp_path, "b"), monkeypatch)
    assert lb["resumed_at_epoch"] == [1] and lb["attempt"] == 1 and lb["steps"] == la["steps"]
    assert lb["epsilon_spent"] == pytest.approx(la["epsilon_spent"], rel=1e-9)
    # running again on the same private data is a second release: the ledger says so
    again, _ = _finetune(params, finetune_io, _outs(tmp_path, "a2", ck="a"))
    assert again["attempt"] == 2
    assert again["epsilon_spent_all_attempts"] == pytest.approx(2 * la["epsilon_spent"], rel=1e-6)


def test_secret_generator_states_are_never_checkpointed(upstream, finetune_io, tmp_path, monkeypatch):
    params = params_of(upstream)
    monkeypatch.setenv("DPLDM_STOP_AFTER_EPOCH", "1")
    with pytest.raises(SystemExit):
        _finetune(params, finetune_io, _outs(tmp_path, "s"))
    state = torch.load(tmp_path / "s/ck/state.pt", weights_only=False)
    assert state["g_data"] is None and state["g_dp"] is None and state["accountant"] is not None


def test_a_non_private_attempt_voids_the_ledger(upstream, finetune_io, tmp_path):
    params = params_of(upstream)
    dp, _ = _finetune(params, finetune_io, _outs(tmp_path, "dp", ck="same"))
    assert dp["epsilon_spent_all_attempts"] == pytest.approx(dp["epsilon_spent"])
    nonpriv, _ = _finetune(params, finetune_io, _outs(tmp_path, "np", ck="same"), private=False)
    assert nonpriv["private"] is False and nonpriv["target_epsilon"] is None and nonpriv["epsilon_spent"] is None
    assert nonpriv["dp_release"] is False and nonpriv["epsilon_spent_all_attempts"] == float("inf")
    later, _ = _finetune(params, finetune_io, _outs(tmp_path, "dp2", ck="same"))  # a DP run after it is void too
    assert later["dp_release"] is True and later["epsilon_spent_all_attempts"] == float("inf")
    assert later["attempt"] == 3


def test_bad_inputs_fail_before_private_data_is_read(upstream, tmp_path, monkeypatch):
    import numpy as np

    from stages import dp_finetune
    from stages.common import ConfigError

    params = params_of(upstream)
    inputs = {"ldm": str(upstream / "models/ldm_public"), "latents": str(upstream / "data/latents/private.npz")}
    outs = {"model": str(tmp_path / "m"), "ledger": str(tmp_path / "l.json"), "checkpoint": str(tmp_path / "ck"),
            "live": str(tmp_path / "lv")}
    monkeypatch.setattr(np, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("private latents were read")))
    for key, value, needle in (("layers", [2, 9], "finetune.layers"), ("delta", 0.01, "finetune.delta"),
                               ("batch_size", 100000, "finetune.batch_size")):
        bad = json.loads(json.dumps(params))
        bad["finetune"][key] = value
        with pytest.raises(ConfigError, match=needle):
            dp_finetune.run(bad, inputs, outs)


def test_attempts_recorded_before_secret_noise_void_the_total():
    from dpldm.ledger import total_epsilon

    legacy = [{"data_sha": "d", "private": True, "target_epsilon": 10.0, "status": "completed", "epsilon_spent": 9.99}]
    assert total_epsilon(legacy, "d") == float("inf")
    current = [{**legacy[0], "dp": True}, {**legacy[0], "dp": True, "status": "started"}]
    assert total_epsilon(current, "d") == pytest.approx(19.99)
    assert total_epsilon(current + [{"data_sha": "d", "dp": False, "uses_private_data": False}], "d") == pytest.approx(19.99)
    assert total_epsilon(current, "other") == 0.0


def test_a_lost_attempt_counts_at_its_target_on_any_data_and_a_lost_non_dp_one_voids():
    from dpldm.config import load_section
    from dpldm.ledger import lost_attempt, total_epsilon, uses_of

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_section(params, "finetune")
    lost = lost_attempt(cfg, where="flow run x on host:1, crashed")
    done = {"data_sha": "d", "dp": True, "status": "completed", "epsilon_spent": 9.99, "target_epsilon": 10.0}
    # its data hash is unknown: it counts as a use of whatever data the ledger is for, at its target
    for sha in ("d", "other"):
        assert uses_of([lost, done], sha) == (2 if sha == "d" else 1)
    assert total_epsilon([lost, done], "d") == pytest.approx(cfg.epsilon + 9.99)
    assert total_epsilon([lost], "other") == pytest.approx(cfg.epsilon)
    nonprivate = lost_attempt(load_section({**params, "finetune": {**params["finetune"], "private": False}}, "finetune"), where="w")
    assert total_epsilon([nonprivate, done], "d") == float("inf")
    public = lost_attempt(load_section({**params, "finetune": {**params["finetune"], "mode": "none"}}, "finetune"), where="w")
    assert uses_of([public, done], "d") == 1 and total_epsilon([public, done], "d") == pytest.approx(9.99)


def test_lora_stage_resumes_and_releases_merged_weights_and_adapters(upstream, finetune_io, tmp_path, monkeypatch):
    """finetune.mode: lora through the stage: an interrupted run resumes to the same adapters; model.pt
    holds them merged (only the targeted projections of the selected modules and the embedder differ from
    the base), adapter.pt holds the adapters alone, and config.json names the base model's hash."""
    from stages.common import file_sha

    params = params_of(upstream)
    lora = {**params["finetune"]["lora"], "rank": 2, "alpha": 2.0, "targets": ["to_q", "to_v"]}
    la, ma = _finetune(params, finetune_io, _outs(tmp_path, "a"), mode="lora", lora=lora, reproducible_noise=True)
    lb, mb = _interrupted_then_resumed(params, finetune_io, _outs(tmp_path, "b"), monkeypatch, mode="lora", lora=lora,
                                       reproducible_noise=True)
    assert lb["resumed_at_epoch"] == [1] and lb["steps"] == la["steps"] and la["lora"]["rank"] == 2
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6)
    base = torch.load(finetune_io["ldm"] + "/model.pt", weights_only=True)
    assert set(ma) == set(base)  # merged: no peft keys left in the released weights
    changed = {k for k in base if not torch.equal(base[k], ma[k])}
    assert changed and all(k.endswith(("to_q.weight", "to_v.weight")) or k.startswith("class_embedder") for k in changed), changed
    assert any(k.endswith("to_q.weight") for k in changed) and any(k.endswith("to_v.weight") for k in changed)
    conf = json.loads((tmp_path / "a/m/config.json").read_text())
    assert conf["lora"]["base_model_sha"] == file_sha(finetune_io["ldm"] + "/model.pt")
    adapter = torch.load(tmp_path / "a/m/adapter.pt", weights_only=True)
    assert adapter and all("lora" in k for k in adapter) and len(la["adapter_params"]) == len(adapter)
