"""The privacy boundary declared in dvc.yaml holds (pipeline/boundary.py): each output's side agrees with
what it depends on, private outputs never leave the private side, and the check catches a mislabel."""
import copy
import subprocess

import pytest
import yaml

from helpers import ROOT
from pipeline.boundary import SIDES, check_boundary, output_sides, outputs, private_only_stages, stage_paths, stages_on_side, state_sides


@pytest.fixture(scope="module")
def dvc_yaml():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_output_declares_a_side_and_the_boundary_holds(dvc_yaml):
    sides = output_sides(dvc_yaml["stages"])
    assert sides and all(s in SIDES for s in sides.values()), sides
    assert check_boundary(dvc_yaml["stages"], metrics=dvc_yaml["metrics"], plots=dvc_yaml["plots"]) == []


def test_the_sides_the_privacy_review_asked_for(dvc_yaml):
    sides = output_sides(dvc_yaml["stages"])
    for path in ("data/private/images.parquet", "reports/prepare_private/grid.png", "data/latents/private.npz",
                 "models/reference_extractor", "data/fid_cache", "dvclive/dp_finetune"):
        assert sides[path] == "private", path
    assert state_sides(dvc_yaml["stages"]) == {"models/checkpoints/dp_finetune": "private", "models/checkpoints/pretrain_ldm": "public"}
    for path in ("models/ldm_private", "data/samples/samples.parquet", "reports/dp_finetune/ledger.json"):
        assert sides[path] == "dp-release", path
    assert sides["dvclive/score_classifier"] == sides["dvclive/score_fid"] == "evaluation"


@pytest.mark.parametrize("path,side", [
    ("data/latents/private.npz", "public"),  # private latents called public
    ("models/reference_extractor", "evaluation"),  # a non-DP model on private data called an aggregate
    ("data/fid_cache", "evaluation"),  # features of private images called an aggregate
    ("dvclive/encode_private", "public"),  # statistics of private latents called public
    ("reports/prepare_private/grid.png", "evaluation"),  # private images called an aggregate
])
def test_the_check_catches_a_mislabel(dvc_yaml, path, side):
    stages = copy.deepcopy(dvc_yaml["stages"])
    for _, p, props in outputs(stages):
        if p == path:
            props["meta"] = {"side": side}
            props.pop("push", None)
    errors = check_boundary(stages)
    assert any(path in e for e in errors), errors


def test_stage_paths_come_from_the_cmd(dvc_yaml):
    paths = stage_paths(dvc_yaml["stages"], "dp_finetune")
    assert paths["ledger"] == "reports/dp_finetune/ledger.json" and paths["checkpoint"] == "models/checkpoints/dp_finetune"
    assert paths["ldm"] == "models/ldm_public" and set(paths) == {"ldm", "latents", "model", "ledger", "checkpoint", "live"}


def test_state_folders_are_declared_and_never_outputs(dvc_yaml):
    stages = copy.deepcopy(dvc_yaml["stages"])
    stages["dp_finetune"]["meta"]["state"]["models/checkpoints/dp_finetune"] = "public"  # checkpoint of private training
    stages["pretrain_ldm"]["outs"].append({"models/checkpoints/pretrain_ldm": {"persist": True, "meta": {"side": "public"}}})
    errors = check_boundary(stages)
    assert any("models/checkpoints/dp_finetune" in e and "'public'" in e for e in errors), errors
    assert any("models/checkpoints/pretrain_ldm" in e and "also a DVC output" in e for e in errors), errors


def test_a_stage_bypassing_dp_finetune_is_caught(dvc_yaml):
    stages = copy.deepcopy(dvc_yaml["stages"])
    stages["sample"]["deps"].append("data/latents/private.npz")  # samples straight from private latents
    assert any("data/samples/samples.parquet" in e for e in check_boundary(stages))


def test_private_outputs_never_leave_the_private_side(dvc_yaml):
    for _stage, path, props in outputs(dvc_yaml["stages"]):
        if props["meta"]["side"] != "private":
            continue
        if props.get("cache", True):
            assert props.get("push") is False, f"{path}: private and cached, so push: false"
        else:  # not cached: DVC leaves it to git, so git must ignore it
            probe = path.rstrip("/") + "/x" if not path.endswith((".json", ".npz", ".png", ".parquet")) else path
            rc = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT).returncode
            assert rc == 0, f"{path}: private and not cached, so it must be git-ignored"
    for path in state_sides(dvc_yaml["stages"]):  # never a DVC output, so never pushed; and never in git
        assert subprocess.run(["git", "check-ignore", "-q", path + "/x"], cwd=ROOT).returncode == 0, path
    docs = {p.name for p in (ROOT / "docs").iterdir()}
    assert not any("private" in d or "prepare_private" in d for d in docs), docs


def test_private_only_stages_are_the_private_source_and_encoding(dvc_yaml):
    assert private_only_stages(dvc_yaml["stages"]) == {"prepare_private", "encode_private"}
    # what pool workers pull from the shared remote instead of recomputing (pipeline/pool.py)
    assert stages_on_side(dvc_yaml["stages"], "public") == ["prepare_public", "pretrain_ae", "encode_public", "pretrain_ldm"]


def test_reference_model_is_marked_and_generators_refuse_it(tmp_path):
    import json

    import torch

    from stages.common import ConfigError, load_model_files, save_model
    from stages.artifacts import load_autoencoder, load_ldm

    save_model(tmp_path / "ref", state_dict={"w": torch.zeros(1)}, config={"evaluation_only": True, "dp": False})
    for loader in (load_ldm, load_autoencoder):
        with pytest.raises(ConfigError, match="evaluation-only"):
            loader(tmp_path / "ref")
    state, conf = load_model_files(tmp_path / "ref")  # scoring code may still read it
    assert conf["evaluation_only"] is True and json.loads((tmp_path / "ref/config.json").read_text())["dp"] is False
