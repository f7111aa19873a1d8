"""Whole-pipeline tests on the tiny profile in a temporary copy of the repo, through the Prefect flow
(tests run in file order: the first run builds everything, later tests change params)."""
import json
import os

import pytest
import torch
import yaml

from helpers import ROOT, dvc_stale, run, set_param

DOWNSTREAM_OF_FINETUNE = {"dp_finetune", "sample", "score_fid", "score_classifier"}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def flow_run(repo):
    from pipeline.flow import dpldm_pipeline

    return {r["stage"]: r["ran"] for r in dpldm_pipeline(repo=str(repo))}


def test_flow_tasks_equal_dvc_yaml_stages():
    from pipeline.flow import stage_order

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    order = stage_order(ROOT)
    assert sorted(order) == sorted(stages)
    pos = {s: i for i, s in enumerate(order)}
    assert pos["pretrain_ae"] < pos["encode_private"] < pos["dp_finetune"] < pos["sample"] < pos["score_fid"]


def test_first_run_executes_every_stage_and_publishes_artifacts(tiny_pipeline, harness):
    ran = flow_run(tiny_pipeline)
    assert all(ran.values()) and len(ran) == 11, ran
    from prefect.artifacts import Artifact

    ledger = json.loads((tiny_pipeline / "reports/dp_finetune/ledger.json").read_text())
    art = Artifact.get("dpldm-privacy-ledger")
    table = art.data if isinstance(art.data, list) else json.loads(art.data)
    row = {r["quantity"]: r["value"] for r in table}
    assert row["epsilon_spent"] == pytest.approx(ledger["epsilon_spent"])
    assert row["noise_multiplier"] == pytest.approx(ledger["noise_multiplier"])
    assert Artifact.get("dpldm-scores") is not None


def test_second_run_executes_nothing(tiny_pipeline, harness):
    assert not any(flow_run(tiny_pipeline).values())


def test_ledger_is_the_accountants_and_within_budget(tiny_pipeline):
    from dpldm.privacy import epsilon_of

    led = json.loads((tiny_pipeline / "reports/dp_finetune/ledger.json").read_text())
    assert led["epsilon_spent"] <= led["target_epsilon"]
    indep = epsilon_of(noise_multiplier=led["noise_multiplier"], sample_rate=led["sample_rate"], steps=led["steps"],
                       delta=led["delta"], accountant=led["accountant"])
    assert led["epsilon_spent"] == pytest.approx(indep, rel=1e-6)
    assert led["steps"] == led["epochs"] * round(1 / led["sample_rate"])
    metrics = run(["dvc", "metrics", "show", "--json"], tiny_pipeline).stdout
    assert "epsilon_spent" in metrics and "fid_domain" in metrics and "cnn_accuracy" in metrics


def test_frozen_parameters_bit_identical_selected_changed(tiny_pipeline):
    before = torch.load(tiny_pipeline / "models/ldm_public/model.pt", weights_only=True)
    after = torch.load(tiny_pipeline / "models/ldm_private/model.pt", weights_only=True)
    trainable = set(json.loads((tiny_pipeline / "models/ldm_private/config.json").read_text())["trainable"])
    assert trainable and set(before) == set(after)
    for name in before:
        if name in trainable:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_changing_epsilon_reruns_exactly_the_stages_after_pretraining(tiny_pipeline, harness):
    set_param(tiny_pipeline, "finetune.epsilon", 5.0)
    assert dvc_stale(tiny_pipeline) == {"dp_finetune"}
    ran = flow_run(tiny_pipeline)
    assert {s for s, r in ran.items() if r} == DOWNSTREAM_OF_FINETUNE


def test_changing_layers_or_private_data_marks_only_their_stages(tiny_pipeline):
    set_param(tiny_pipeline, "finetune.layers", [4, 7])
    assert dvc_stale(tiny_pipeline) == {"dp_finetune"}
    set_param(tiny_pipeline, "finetune.layers", [1, 7])
    set_param(tiny_pipeline, "data.private.n_test", 90)
    assert dvc_stale(tiny_pipeline) == {"prepare_private"}
    set_param(tiny_pipeline, "data.private.n_test", 100)
    assert dvc_stale(tiny_pipeline) == set()


def test_changing_ldm_params_does_not_rerun_autoencoder_or_encoding(tiny_pipeline, harness):
    set_param(tiny_pipeline, "ldm.lr", 0.002)
    ran = flow_run(tiny_pipeline)
    assert {s for s, r in ran.items() if r} == {"pretrain_ldm"} | DOWNSTREAM_OF_FINETUNE


def _artifact_text(key):
    from prefect.artifacts import Artifact

    art = Artifact.get(key)
    return f"{art.description} {art.data}"


def test_default_run_is_a_dp_release_and_says_so(tiny_pipeline):
    led = json.loads((tiny_pipeline / "reports/dp_finetune/ledger.json").read_text())
    assert led["dp_release"] is True and led["release"].startswith("DP release") and "os.urandom" in led["noise_source"]
    assert "DP release" in _artifact_text("dpldm-scores") and "NOT A DP RELEASE" not in _artifact_text("dpldm-scores")


def test_reproducible_noise_stamps_every_downstream_output(tiny_pipeline, harness):
    import pyarrow.parquet as pq

    set_param(tiny_pipeline, "finetune.reproducible_noise", True)
    try:
        ran = flow_run(tiny_pipeline)
        assert {s for s, r in ran.items() if r} == DOWNSTREAM_OF_FINETUNE
        stamp = "not a DP release"
        led = json.loads((tiny_pipeline / "reports/dp_finetune/ledger.json").read_text())
        assert led["dp_release"] is False and stamp in led["release"]
        conf = json.loads((tiny_pipeline / "models/ldm_private/config.json").read_text())
        assert conf["release"]["dp_release"] is False
        meta = json.loads(pq.read_schema(tiny_pipeline / "data/samples/samples.parquet").metadata[b"dpldm"])
        assert meta["release"]["dp_release"] is False and stamp in meta["release"]["release"]
        for stage in ("sample", "score_fid", "score_classifier"):
            assert stamp in json.loads((tiny_pipeline / f"dvclive/{stage}/metrics.json").read_text())["release"], stage
        shown = run(["dvc", "metrics", "show", "--json"], tiny_pipeline).stdout
        assert shown.count(stamp) >= 4  # ledger, sample, score_fid, score_classifier
        assert stamp in _artifact_text("dpldm-privacy-ledger") and "NOT A DP RELEASE" in _artifact_text("dpldm-scores")
    finally:
        set_param(tiny_pipeline, "finetune.reproducible_noise", False)


def test_sweep_over_two_epsilons_builds_table_and_plot(tiny_pipeline, harness):
    from helpers import run as sh
    from pipeline.sweep import comparison, run_sweep, settings_of, write_outputs

    sh(["git", "add", "-A"], tiny_pipeline)
    sh(["git", "commit", "-qm", "built"], tiny_pipeline)
    # the first setting changes a key the later ones don't set: they must not inherit it
    settings = settings_of([], [], ["frozen:finetune.mode=none", "seeded:finetune.reproducible_noise=true"]) \
        + settings_of([2.0, 8.0], [], [])
    run_sweep(settings, repo=str(tiny_pipeline))
    full = comparison([n for n, _ in settings], repo=str(tiny_pipeline))
    is_base = full["experiment"].str.startswith("baseline@")
    assert is_base.sum() == 1  # the committed run the experiments branch from, as `dvc exp show` lists it
    assert full.loc[full["experiment"] == "frozen", "mode"].tolist() == ["none"]
    assert "public model" in full.loc[full["experiment"] == "frozen", "release"].item()
    assert "not a DP release" in full.loc[full["experiment"] == "seeded", "release"].item()
    df = full[~is_base & ~full["experiment"].isin(["frozen", "seeded"])].reset_index(drop=True)
    assert df["release"].str.startswith("DP release").all() and df["private"].tolist() == df["dp_release"].tolist() == [True, True]
    assert not full.loc[full["experiment"] == "seeded", "dp_release"].item()
    assert not full.loc[full["experiment"] == "frozen", "private"].item()
    assert df["experiment"].tolist() == ["eps2", "eps8"]
    assert df["mode"].tolist() == ["attention", "attention"]
    assert [float(e) for e in df["epsilon_target"]] == [2.0, 8.0]
    spent = [float(e) for e in df["epsilon_spent"]]
    assert spent[0] < spent[1] <= 8.0 and spent[0] <= 2.0
    led = json.loads((tiny_pipeline / "reports/dp_finetune/ledger.json").read_text())  # the last experiment's, applied
    assert spent[1] == pytest.approx(led["epsilon_spent"], rel=1e-6)
    files = write_outputs(df, tiny_pipeline / "reports/sweep")
    assert all(os.path.getsize(f) > 0 for f in files.values())
