"""benchmarks/ae_variants.py on the tiny profile: public data only, the stage's own training, reuse."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from dpldm.config import load_section
from helpers import ROOT, run, tiny_repo


@pytest.mark.slow
def test_ae_variants_train_with_the_stage_and_are_judged_on_public_data(tmp_path):
    repo = tiny_repo(tmp_path / "repo")
    run([str(Path(sys.executable).parent / "dvc"), "repro", "prepare_public"], repo)  # only the public images
    ae = load_section(yaml.safe_load((repo / "params.yaml").read_text()), "ae")
    epochs = ae.epochs
    args = [sys.executable, str(ROOT / "benchmarks/ae_variants.py"), "--variant", f"more:ae.epochs={epochs + 1}"]
    # the AE trained by its stage with the override; the public set encoded with it, the default LDM trained and judged
    run(args + ["--ldm", "--seeds", "1", "--per-class", "6", "--out", str(tmp_path / "w")], repo)
    row = [ln.split("|")[1:-1] for ln in (tmp_path / "w.md").read_text().splitlines() if ln.startswith("| more")][0]
    assert row[2].strip() == f"{epochs + 1} x {ae.batch_size}"
    assert float(row[4]) > 0 and float(row[5]) > 0 and float(row[6]) > 0 and float(row[7]) > 0, row  # PSNR, MSE, scale, s
    consistency, tstr = float(row[9]), float(row[13])
    assert 0 <= consistency <= 1 and 0 <= tstr <= 1 and float(row[8]) > 0, row  # and the LDM's held-out loss
    work = repo / "build/ae_variants"
    assert json.loads((work / "more/ae_trained.json").read_text())["ae"]["epochs"] == epochs + 1
    assert yaml.safe_load((work / "more/params.yaml").read_text())["ae"]["epochs"] == epochs + 1
    assert (work / "more/public.npz").exists() and (work / "ldm_more/ldm/config.json").exists()
    assert len((tmp_path / "w.csv").read_text().splitlines()) == 1 + 1  # header + 1 variant x 1 seed
    # a second invocation reuses the AE; without --ldm the row stops after the reconstruction columns
    again = run(args + ["--out", str(tmp_path / "v")], repo)
    assert "more: reusing" in again.stdout
    short = [ln.split("|")[1:-1] for ln in (tmp_path / "v.md").read_text().splitlines() if ln.startswith("| more")][0]
    assert short == row[:8]
    # the same name with another ae section: the AE is retrained and the latents and LDM made from the old one dropped
    run([*args[:-1], f"more:ae.epochs={epochs + 2}", "--out", str(tmp_path / "u")], repo)
    assert json.loads((work / "more/ae_trained.json").read_text())["ae"]["epochs"] == epochs + 2
    assert not (work / "more/public.npz").exists() and not (work / "ldm_more").exists()
    assert not (repo / "data/private").exists() and not (repo / "models").exists()  # nothing private, no stage model


def test_weights_hash_sees_every_tensor(tmp_path):
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from isa_repro import weights_sha256

    state = {"state_dict": {"a.weight": torch.ones(3, 2), "b.bias": torch.zeros(4)}, "config": {"x": 1}}
    torch.save(state, tmp_path / "one.pt")
    torch.save({"config": {"x": 1}, "state_dict": {"b.bias": torch.zeros(4), "a.weight": torch.ones(3, 2)}}, tmp_path / "two.pt")
    assert weights_sha256(tmp_path / "one.pt") == weights_sha256(tmp_path / "two.pt")  # same tensors, any key order
    state["state_dict"]["b.bias"][2] = torch.finfo(torch.float32).tiny  # one value, by the smallest normal float
    torch.save(state, tmp_path / "three.pt")
    assert weights_sha256(tmp_path / "three.pt") != weights_sha256(tmp_path / "one.pt")


@pytest.mark.slow
def test_isa_repro_trains_the_public_models_with_their_stages_and_a_rerun_is_bit_identical(tmp_path):
    repo = tiny_repo(tmp_path / "repo")
    run([str(Path(sys.executable).parent / "dvc"), "repro", "prepare_public"], repo)  # only the public images
    script = [sys.executable, str(ROOT / "benchmarks/isa_repro.py")]
    run(script + ["--settings", "native", "--repeats", "2", "--ldm", "--out", str(tmp_path / "isa.md")], repo)
    run(script + ["--settings", "avx2", "--work", "build/isa_avx2", "--out", str(tmp_path / "avx2.md")], repo)
    table = lambda name: [[c.strip() for c in ln.split("|")[1:-1]] for ln in (tmp_path / name).read_text().splitlines()
                          if ln.startswith("| native") or ln.startswith("| avx2")]
    one, two = table("isa.md")
    assert (one[0], one[2], two[2]) == ("native", "1", "2") and one[1] == "`(none)`"
    # the same processor settings in a fresh process: the same AE and LDM to the last bit
    assert one[3:6] + one[7:9] == two[3:6] + two[7:9], (one, two)  # PSNR, scale, AE hash; LDM loss and hash
    assert float(one[3]) > 0 and float(one[4]) > 0 and float(one[7]) > 0
    (avx2,) = table("avx2.md")
    assert avx2[0] == "avx2" and "ONEDNN_MAX_CPU_ISA=AVX2" in avx2[1] and len(avx2) == 7  # no LDM columns without --ldm
    assert not (repo / "data/private").exists() and not (repo / "models").exists()  # public only, no stage model
