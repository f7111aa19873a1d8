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
