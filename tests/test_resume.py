"""Interrupted runs resume to the same result as uninterrupted ones (stage functions called directly
on the tiny pipeline's files)."""
import json

import pytest
import torch
import yaml

from helpers import run


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


def test_dp_finetune_resume_keeps_the_ledger_and_a_retry_is_counted(upstream, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from stages import dp_finetune

    run([str(Path(sys.executable).parent / "dvc"), "repro", "pretrain_ldm"], upstream)
    params = params_of(upstream)
    inputs = {"ldm": str(upstream / "models/ldm_public"), "latents": str(upstream / "data/latents/private.npz")}
    outs = lambda d: {"model": str(tmp_path / d / "m"), "ledger": str(tmp_path / d / "ledger.json"),
                      "checkpoint": str(tmp_path / d / "ck"), "live": str(tmp_path / d / "live")}
    dp_finetune.run(params, inputs, outs("a"))
    monkeypatch.setenv("DPLDM_STOP_AFTER_EPOCH", "1")
    with pytest.raises(SystemExit):
        dp_finetune.run(params, inputs, outs("b"))
    monkeypatch.delenv("DPLDM_STOP_AFTER_EPOCH")
    dp_finetune.run(params, inputs, outs("b"))
    la, lb = (json.loads((tmp_path / d / "ledger.json").read_text()) for d in ("a", "b"))
    assert lb["steps"] == la["steps"] and lb["epsilon_spent"] == pytest.approx(la["epsilon_spent"], rel=1e-9)
    assert lb["resumed_at_epoch"] == [1] and lb["attempt"] == 1
    ma, mb = (torch.load(tmp_path / d / "m/model.pt", weights_only=True) for d in ("a", "b"))
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6)
    # running again on the same private data is a second release: the ledger says so
    dp_finetune.run(params, inputs, outs("a"))
    again = json.loads((tmp_path / "a/ledger.json").read_text())
    assert again["attempt"] == 2
    assert again["epsilon_spent_all_attempts"] == pytest.approx(2 * la["epsilon_spent"], rel=1e-6)


def test_bad_inputs_fail_before_private_data_is_read(upstream, tmp_path, monkeypatch):
    import numpy as np

    from stages import dp_finetune
    from stages.common import ConfigError

    params = params_of(upstream)
    inputs = {"ldm": str(upstream / "models/ldm_public"), "latents": str(upstream / "data/latents/private.npz")}
    outs = {"model": str(tmp_path / "m"), "ledger": str(tmp_path / "l.json"), "checkpoint": str(tmp_path / "ck"), "live": str(tmp_path / "lv")}
    monkeypatch.setattr(np, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("private latents were read")))
    for key, value, needle in (("layers", [2, 9], "finetune.layers"), ("delta", 0.01, "finetune.delta"),
                               ("batch_size", 100000, "finetune.batch_size")):
        bad = json.loads(json.dumps(params))
        bad["finetune"][key] = value
        with pytest.raises(ConfigError, match=needle):
            dp_finetune.run(bad, inputs, outs)
