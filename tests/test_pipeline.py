"""Whole-pipeline tests on the tiny profile in a temporary copy of the repo, through the Prefect flow
(tests run in file order: the first run builds everything, later tests change params)."""
import json
import os

import pytest
import torch
import yaml

from helpers import ROOT, dvc_stale, run, set_param

pytestmark = pytest.mark.slow

DOWNSTREAM_OF_FINETUNE = {"dp_finetune", "sample", "score_fid", "score_classifier", "audit"}


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
    assert all(ran.values()) and len(ran) == 12, ran
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


PUBLIC_UPSTREAM = {"prepare_public", "pretrain_ae", "encode_public", "pretrain_ldm"}


def test_a_clone_pulls_the_public_upstream_and_never_the_private(tiny_pipeline, tmp_path):
    """Another machine (a clone with the same dvc.lock and a shared DVC remote) restores every public
    stage from the remote, retrains none of them, and gets no private output: those it recomputes."""
    import shutil
    import sys
    from pathlib import Path

    dvc = str(Path(sys.executable).parent / "dvc")
    remote = tmp_path / "remote"
    run([dvc, "remote", "add", "--local", "-f", "-d", "loopback", str(remote)], tiny_pipeline)
    run([dvc, "push"], tiny_pipeline)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(tiny_pipeline), str(clone)], tmp_path)
    shutil.copy(tiny_pipeline / "dvc.lock", clone / "dvc.lock")  # what a committed baseline carries
    run([dvc, "remote", "add", "--local", "-f", "-d", "loopback", str(remote)], clone)
    run([dvc, "pull", *PUBLIC_UPSTREAM], clone)
    stale = dvc_stale(clone)
    assert not stale & PUBLIC_UPSTREAM, stale  # restored, so not to be retrained
    assert {"prepare_private", "encode_private", "dp_finetune"} <= stale, stale
    lock = yaml.safe_load((tiny_pipeline / "dvc.lock").read_text())["stages"]
    pushed = {(p.parent.name + p.name).removesuffix(".dir") for p in remote.rglob("*") if p.is_file()}
    private = {o["md5"].removesuffix(".dir") for st in ("prepare_private", "encode_private") for o in lock[st]["outs"] if "md5" in o}
    public = {o["md5"].removesuffix(".dir") for o in lock["pretrain_ldm"]["outs"] if "md5" in o}
    assert private and not private & pushed, "a private output reached the shared remote"
    assert public <= pushed
    out = run([dvc, "repro", "pretrain_ldm"], clone).stdout
    assert "Running stage" not in out, out


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
    assert "whitebox_epsilon_lower_bound" in metrics and "membership_auc" in metrics
    fid = json.loads((tiny_pipeline / "dvclive/score_fid/metrics.json").read_text())
    assert 0 <= fid["label_consistency_min_class"] <= fid["label_consistency"] <= 1


def test_audit_stage_reports_a_bound_below_the_claim(tiny_pipeline, harness):
    audit = json.loads((tiny_pipeline / "dvclive/audit/metrics.json").read_text())
    assert audit["whitebox_canaries"] == 1000 and audit["whitebox_guesses"] == 200
    assert 0 <= audit["whitebox_epsilon_lower_bound"] < audit["audit_epsilon_claimed"]
    assert audit["whitebox_bound_exceeds_claim"] == 0 and audit["audit"].startswith("bound below the claim")
    assert 0.0 <= audit["membership_auc"] <= 1.0 and 0.0 <= audit["membership_auc_public_model"] <= 1.0
    assert "epsilon lower bound" in _artifact_text("dpldm-audit")


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


def test_public_sampler_sweep_needs_nothing_but_public_artifacts(tiny_pipeline, tmp_path):
    import shutil
    import sys

    # a folder holding only the public side: no private parquet, no fine-tuned model, no reference CNN
    for rel in ("models/ldm_public", "models/ae"):
        shutil.copytree(tiny_pipeline / rel, tmp_path / rel)
    (tmp_path / "data/public").mkdir(parents=True)
    shutil.copy(tiny_pipeline / "data/public/images.parquet", tmp_path / "data/public/images.parquet")
    shutil.copy(tiny_pipeline / "params.yaml", tmp_path / "params.yaml")
    out = tmp_path / "sweep.md"
    sweep = [sys.executable, str(ROOT / "benchmarks/sampling_sweep.py"), "--public", "--tstr", "--per-class", "4",
             "--threads", "1", "--out", str(out), "--settings", "eta=1,steps=2,w=0"]
    # the default model is pretrained without label dropout: guidance, asked for, stops the sweep before any work
    refused = run(sweep + ["eta=0,steps=3,w=1"], tmp_path, check=False)
    assert refused.returncode != 0 and "ldm.label_dropout = 0" in refused.stderr and not out.exists()
    p = run(sweep + ["eta=0,steps=3,w=0,spacing=trailing"], tmp_path)
    rows = [ln.split("|")[1:-1] for ln in out.read_text().splitlines() if ln.startswith("| eta")]
    assert [r[0].strip() for r in rows] == ["eta=1,steps=2,w=0", "eta=0,steps=3,w=0,spacing=trailing"], p.stdout
    for r in rows:  # label consistency, precision, recall and the public-test accuracy are shares
        assert all(0.0 <= float(r[i]) <= 1.0 for i in (1, 3, 4, 5)), r
    assert "No private or proxy data read" in out.read_text()
    assert out.read_text().startswith("`python benchmarks/sampling_sweep.py --public --tstr")  # provenance first
    assert not (tmp_path / "data/private").exists() and not (tmp_path / "models/ldm_private").exists()
    # the proxy mode refuses the real private set unless told, and then shares the sampling and TSTR code
    args = [sys.executable, str(ROOT / "benchmarks/sampling_sweep.py"), "--tstr", "--per-class", "3", "--settings",
            "eta=1,steps=2,w=0", "--threads", "1", "--out", str(tmp_path / "proxy.md")]
    refused = run(args, tiny_pipeline, check=False)
    assert refused.returncode != 0 and "invariant 7" in refused.stderr
    run(args + ["--allow-private"], tiny_pipeline)
    assert "REAL PRIVATE DATA" in (tmp_path / "proxy.md").read_text()
    assert (tmp_path / "proxy.md").read_text().startswith("`python benchmarks/sampling_sweep.py --tstr")
    assert [ln for ln in (tmp_path / "proxy.md").read_text().splitlines() if ln.startswith("| eta=1,steps=2,w=0 |")]

def test_public_ldm_variants_train_with_the_stage_and_are_judged_on_public_data(tiny_pipeline, tmp_path):
    import shutil
    import sys

    # only the public side: AE, public latents, public images
    for rel in ("models/ae",):
        shutil.copytree(tiny_pipeline / rel, tmp_path / rel)
    for rel in ("data/public/images.parquet", "data/latents/public.npz", "params.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_pipeline / rel, tmp_path / rel)
    args = [sys.executable, str(ROOT / "benchmarks/public_ldm_variants.py"), "--variant", "default:",
            "--variant", "lr:ldm.lr=0.004", "--seeds", "2", "--per-class", "6", "--out", str(tmp_path / "v")]
    run(args, tmp_path)
    rows = [ln.split("|")[1:-1] for ln in (tmp_path / "v.md").read_text().splitlines() if ln.startswith(("| default", "| lr"))]
    assert [r[0].strip() for r in rows] == ["default", "lr"]
    for r in rows:  # two seeds: every judged cell is "mean ± std"; label consistency and TSTR are shares
        assert all("±" in c for c in r[4:]), r
        assert 0 <= float(r[4].split("±")[0]) <= 1 and 0 <= float(r[8].split("±")[0]) <= 1, r
    trained = json.loads((tmp_path / "build/public_ldm_variants/lr/trained.json").read_text())
    assert trained["ldm"]["lr"] == 0.004
    assert yaml.safe_load((tmp_path / "build/public_ldm_variants/lr/params.yaml").read_text())["ldm"]["lr"] == 0.004
    csv_rows = (tmp_path / "v.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 2  # header + 2 variants x 2 seeds
    again = run(args[:4] + ["--seeds", "1", "--per-class", "6", "--out", str(tmp_path / "w")], tmp_path)
    assert "default: reusing" in again.stdout  # a second invocation only adds variants
    # a reused model without the stage's live metrics (pre-placed by hand) is judged, its held-out loss nan
    (tmp_path / "build/public_ldm_variants/default/live/metrics.json").unlink()
    third = run(args[:4] + ["--seeds", "1", "--per-class", "6", "--out", str(tmp_path / "u")], tmp_path)
    assert "held-out loss not recorded" in third.stdout
    row = [ln for ln in (tmp_path / "u.md").read_text().splitlines() if ln.startswith("| default")][0]
    assert row.split("|")[3].strip() == "nan", row
    assert not (tmp_path / "data/private").exists() and not (tmp_path / "models/ldm_private").exists()


def test_changing_layers_or_private_data_marks_only_their_stages(tiny_pipeline):
    set_param(tiny_pipeline, "finetune.layers", [4, 7])
    assert dvc_stale(tiny_pipeline) == {"dp_finetune", "audit"}
    set_param(tiny_pipeline, "finetune.layers", [1, 7])
    set_param(tiny_pipeline, "data.private.n_test", 90)
    assert dvc_stale(tiny_pipeline) == {"prepare_private"}
    set_param(tiny_pipeline, "data.private.n_test", 100)
    assert dvc_stale(tiny_pipeline) == set()


def descendants(stage: str) -> set[str]:
    """Stages downstream of ``stage`` in dvc.yaml's graph (through outputs listed as deps)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    produced = {(o if isinstance(o, str) else next(iter(o))): n for n, st in stages.items() for o in st["outs"]}
    found, frontier = set(), {stage}
    while frontier:
        nxt = {n for n, st in stages.items() for d in st["deps"] if produced.get(d) in frontier} - found
        found |= nxt
        frontier = nxt
    return found


def test_changing_ldm_params_does_not_rerun_autoencoder_or_encoding(tiny_pipeline):
    """An ldm change makes only pretrain_ldm stale; what can re-run after it is its descendants, which
    are the fine-tuning stages, never the AE or the encoding."""
    before = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())["ldm"]["lr"]
    set_param(tiny_pipeline, "ldm.lr", before * 2)
    try:
        assert dvc_stale(tiny_pipeline) == {"pretrain_ldm"}
    finally:
        set_param(tiny_pipeline, "ldm.lr", before)
    assert descendants("pretrain_ldm") == DOWNSTREAM_OF_FINETUNE
    assert not descendants("pretrain_ldm") & {"pretrain_ae", "encode_public", "encode_private", "prepare_public"}


def _artifact_text(key):
    from prefect.artifacts import Artifact

    art = Artifact.get(key)
    return f"{art.description} {art.data}"


def test_default_run_is_a_dp_release_and_says_so(tiny_pipeline, harness):
    led = json.loads((tiny_pipeline / "reports/dp_finetune/ledger.json").read_text())
    assert led["dp_release"] is True and led["release"].startswith("DP release") and "os.urandom" in led["noise_source"]
    assert "DP release" in _artifact_text("dpldm-scores") and "NOT A DP RELEASE" not in _artifact_text("dpldm-scores")


def test_changing_epsilon_reruns_exactly_the_stages_after_pretraining_and_seeded_noise_stamps_them(tiny_pipeline, harness):
    """One flow run after changing finetune params (epsilon, and the seeded-noise switch): exactly the
    stages after pretraining run, and the "not a DP release" stamp reaches every output made from it."""
    import pyarrow.parquet as pq

    set_param(tiny_pipeline, "finetune.epsilon", 5.0)
    assert dvc_stale(tiny_pipeline) == {"dp_finetune", "audit"}
    set_param(tiny_pipeline, "finetune.reproducible_noise", True)
    ran = flow_run(tiny_pipeline)
    assert {s for s, r in ran.items() if r} == DOWNSTREAM_OF_FINETUNE
    stamp = "not a DP release"
    led = json.loads((tiny_pipeline / "reports/dp_finetune/ledger.json").read_text())
    assert led["dp_release"] is False and stamp in led["release"] and led["target_epsilon"] == 5.0
    conf = json.loads((tiny_pipeline / "models/ldm_private/config.json").read_text())
    assert conf["release"]["dp_release"] is False
    meta = json.loads(pq.read_schema(tiny_pipeline / "data/samples/samples.parquet").metadata[b"dpldm"])
    assert meta["release"]["dp_release"] is False and stamp in meta["release"]["release"]
    for stage in ("sample", "score_fid", "score_classifier"):
        assert stamp in json.loads((tiny_pipeline / f"dvclive/{stage}/metrics.json").read_text())["release"], stage
    shown = run(["dvc", "metrics", "show", "--json"], tiny_pipeline).stdout
    assert shown.count(stamp) >= 4  # ledger, sample, score_fid, score_classifier
    assert stamp in _artifact_text("dpldm-privacy-ledger") and "NOT A DP RELEASE" in _artifact_text("dpldm-scores")
    set_param(tiny_pipeline, "finetune.reproducible_noise", False)


def test_sweep_builds_table_and_plot_and_no_setting_inherits_another(tiny_pipeline, harness):
    """Serial sweep in one workspace (the comparison across two epsilons is tests/test_loopback.py's)."""
    from helpers import run as sh
    from pipeline.sweep import comparison, run_sweep, settings_of, write_outputs

    sh(["git", "add", "-A"], tiny_pipeline)
    sh(["git", "commit", "-qm", "built"], tiny_pipeline)
    # the first setting changes a key the later ones don't set: they must not inherit it
    settings = settings_of([], [], ["seeded:finetune.reproducible_noise=true"]) + settings_of([2.0], [], [])
    run_sweep(settings, repo=str(tiny_pipeline))
    full = comparison([n for n, _ in settings], repo=str(tiny_pipeline))
    is_base = full["experiment"].str.startswith("baseline@")
    assert is_base.sum() == 1  # the committed run the experiments branch from, as `dvc exp show` lists it
    assert "not a DP release" in full.loc[full["experiment"] == "seeded", "release"].item()
    df = full[~is_base & (full["experiment"] != "seeded")].reset_index(drop=True)
    assert df["release"].str.startswith("DP release").all() and df["private"].tolist() == df["dp_release"].tolist() == [True]
    assert full.loc[full["experiment"] == "seeded", "dp_release"].item() is False
    assert df["experiment"].tolist() == ["eps2"] and df["mode"].tolist() == ["attention"]
    assert [float(e) for e in df["epsilon_target"]] == [2.0]
    spent = [float(e) for e in df["epsilon_spent"]]
    assert 1.8 < spent[0] <= 2.0
    led = json.loads((tiny_pipeline / "reports/dp_finetune/ledger.json").read_text())  # the last experiment's, applied
    assert spent[0] == pytest.approx(led["epsilon_spent"], rel=1e-6)
    # every experiment branches from the public models the workspace built, whose hashes the comparison records
    lock = yaml.safe_load((tiny_pipeline / "dvc.lock").read_text())["stages"]
    built = [next(o["md5"] for o in lock[s]["outs"] if o["path"].startswith("models/")) for s in ("pretrain_ae", "pretrain_ldm")]
    assert full[["public_ae", "public_ldm"]].drop_duplicates().values.tolist() == [built]
    files = write_outputs(df, tiny_pipeline / "reports/sweep")
    assert all(os.path.getsize(f) > 0 for f in files.values())
