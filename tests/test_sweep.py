"""The sweep's settings: how --extra / --set strings become experiment params, and the plot's labels."""
import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pipeline.sweep import parse_assignments, setting_label, settings_of, visible_output


def test_assignments_keep_yaml_lists_whole():
    assert parse_assignments("finetune.layers=[4,7],finetune.mode=lora,finetune.lora.rank=16") == {
        "finetune.layers": [4, 7], "finetune.mode": "lora", "finetune.lora.rank": 16}
    with pytest.raises(ValueError, match="finetune.epsilon"):
        parse_assignments("finetune.epsilon")


def test_common_overrides_reach_every_setting_and_a_settings_own_value_wins():
    s = dict(settings_of([1.0, 10.0], [], ["np:finetune.private=false,finetune.epochs=2"], {"finetune.epochs": 5, "sample.per_class": 20}))
    assert s["eps1"] == {"finetune.epsilon": 1.0, "finetune.epochs": 5, "sample.per_class": 20}
    assert s["eps10"]["finetune.epochs"] == 5
    assert s["np"] == {"finetune.private": False, "finetune.epochs": 2, "sample.per_class": 20}
    with pytest.raises(ValueError, match="name:key=value"):
        settings_of([], [], ["finetune.private=false"])


def test_plot_labels_tell_modes_layers_and_ranks_apart():
    rows = [{"mode": "attention", "layers": "[1, 7]", "lora_rank": 4}, {"mode": "attention", "layers": "[4, 7]", "lora_rank": 4},
            {"mode": "lora", "layers": "[1, 7]", "lora_rank": 4}, {"mode": "lora", "layers": "[1, 7]", "lora_rank": 16},
            {"mode": "full", "layers": "[1, 7]", "lora_rank": 4}]
    labels = [setting_label(pd.Series(r)) for r in rows]
    assert len(set(labels)) == 5 and labels[4] == "full"
    assert labels[3] == "lora [1, 7] r16" and setting_label(pd.Series({**rows[3], "lora_rank": 16.0})) == labels[3]


def test_plot_skips_rows_without_scores(tmp_path):
    """dvc exp show writes "!" where a run has no value (a baseline never run to the scores)."""
    from pipeline.sweep import plot

    row = {"layers": "[1, 7]", "mode": "attention", "lora_rank": 4, "cnn_accuracy_std": 0.01}
    df = pd.DataFrame([{**row, "experiment": "baseline@x", "epsilon_target": 10, "private": "!", "cnn_accuracy": "!", "fid_domain": "!"},
                       {**row, "experiment": "eps1", "epsilon_target": 1, "private": True, "cnn_accuracy": 0.6, "fid_domain": 200.0},
                       {**row, "experiment": "eps10", "epsilon_target": 10, "private": "true", "cnn_accuracy": 0.7, "fid_domain": 190.0}])
    plot(df, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_inside_a_flow_run_only_dvcs_own_lines_are_printed():
    """An experiment runs private stages; their output must not reach the Prefect server's log."""
    out = ("Running stage 'encode_private':\n> python -m stages.encode_private ...\n"
           '{"latent_mean": 0.123, "latent_std": 0.98}\n' "Updating lock file 'dvc.lock'\n"
           "ERROR: failed to reproduce 'dp_finetune'\n")
    shown = visible_output(out, in_flow_run=True)
    assert "latent_mean" not in shown and "stages.encode_private" not in shown
    assert "Running stage 'encode_private'" in shown and "ERROR: failed" in shown and "Updating lock file" in shown
    assert "latent_mean" in visible_output(out, in_flow_run=False)  # this machine's own terminal


def test_a_resubmitted_setting_writes_its_lost_runs_into_the_attempt_records_dp_finetune_reads(tmp_path):
    import json
    import shutil

    from helpers import ROOT
    from pipeline.boundary import read_stages, stage_paths
    from pipeline.pool import record_lost_attempts

    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    lost = [{"flow_run": "abc", "state": "CRASHED", "worker": "host:42"}]
    record_lost_attempts(str(tmp_path), {"finetune.epsilon": 2.0}, lost)
    path = tmp_path / stage_paths(read_stages(tmp_path), "dp_finetune")["checkpoint"] / "attempts.json"
    (rec,) = json.loads(path.read_text())
    # the lost run's own setting (committed params + its override), not the committed epsilon
    assert rec["target_epsilon"] == 2.0 and rec["status"] == "lost" and rec["data_sha"] is None
    assert "abc" in rec["where"] and "host:42" in rec["where"]
    with pytest.raises(RuntimeError, match="fresh clone"):  # never over the records of an attempt in this clone
        record_lost_attempts(str(tmp_path), {"finetune.epsilon": 2.0}, lost)


def _params() -> dict:
    """The repository's params.yaml (the make-repro defaults)."""
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def _benchmark(name: str):
    """A script of benchmarks/ loaded as a module (the folder is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_table_gives_each_epsilon_independent_runs_and_averages_over_them():
    q = _benchmark("quality")
    grid = q.settings([1.0, 10.0], 3, {"sample.per_class": 20})
    names = [n for n, _, _ in grid]
    assert names[0] == "q-public-only" and names[-1] == "q-nonprivate"  # non-private last: it voids the ledger's total
    eps10 = [s for n, row, s in grid if row == "epsilon 10"]
    assert len(eps10) == 3 and len({s["runtime.seeds.dp_finetune"] for s in eps10}) == 3  # params differ: DVC runs each
    assert all(s["sample.per_class"] == 20 and s["finetune.epsilon"] == 10 for s in eps10)
    # the non-private row's own schedule goes into that row only, under a name of its own
    own = q.settings([10.0], 1, {"sample.per_class": 20}, {"finetune.epochs": 40, "finetune.lr": 0.006})
    (np_name, np_row, np_params), dp = own[-1], own[1][2]
    assert np_row == "non-private" and np_name == "q-nonprivate-epochs40-lr0p006"
    assert np_params == {"sample.per_class": 20, "finetune.epochs": 40, "finetune.lr": 0.006, "finetune.private": False}
    assert "finetune.epochs" not in dp and "finetune.lr" not in dp
    assert q.settings([10.0], 1, {}, {})[-1][0] == "q-nonprivate"
    # more non-private runs: run 1 keeps its name and seed, each later run its own seed above it (--set's included)
    nps = [g for g in q.settings([10.0], 1, {"runtime.seeds.dp_finetune": 1}, {"finetune.epochs": 40}, 3) if g[1] == "non-private"]
    assert [n for n, _, _ in nps] == ["q-nonprivate-epochs40", "q-nonprivate-epochs40-run2", "q-nonprivate-epochs40-run3"]
    assert [s["runtime.seeds.dp_finetune"] for _, _, s in nps] == [1, 2, 3]
    assert all(s["finetune.private"] is False and s["finetune.epochs"] == 40 for _, _, s in nps)
    assert q.settings([10.0], 1, {}, {}, 2)[-1][2]["runtime.seeds.dp_finetune"] == 1
    # more DP runs for a row measured before: new names and seeds, none shared with runs 1..3
    more = [(n, s) for n, row, s in q.settings([10.0], 3, {}, first_run=4) if row == "epsilon 10"]
    assert [n for n, _ in more] == ["q-eps10-run4", "q-eps10-run5", "q-eps10-run6"]
    assert not {s["runtime.seeds.dp_finetune"] for _, s in more} & {s["runtime.seeds.dp_finetune"] for s in eps10}
    base = {"experiment": "", "cnn_accuracy_std": 0.01, "mlp_accuracy": 0.5, "logreg_accuracy": 0.4, "fid_domain": 100.0}
    runs = [{**base, "experiment": n, "cnn_accuracy": a, "epsilon_spent": e, "label_consistency": c}
            for n, a, e, c in [("q-eps10-run1", 0.80, 9.99, 0.7), ("q-eps10-run2", 0.90, 9.99, 0.8), ("q-eps10-run3", "!", "!", "!"),
                               ("q-public-only", 0.6, None, None), ("other", 0.1, 1.0, 0.1)]]
    row_of = {n: row for n, row, _ in grid}
    t = q.aggregate(pd.DataFrame(runs), row_of, {"real_cnn_accuracy": 0.96, "real_cnn_accuracy_std": 0.002,
                                                   "real_mlp_accuracy": 0.93, "real_logreg_accuracy": 0.9}).set_index("setting")
    # a run without scores ("!") is shown as missing, not averaged; the std is over runs, not over CNN seeds
    assert t.loc["epsilon 10", "runs"] == "2 of 3" and t.loc["epsilon 10", "CNN accuracy %"] == "85.0 ± 7.1"
    assert t.loc["public-only", "epsilon spent"] == "-" and t.loc["public-only", "CNN accuracy %"] == "60.0"
    assert t.loc["epsilon 10", "label consistency"] == "0.75" and t.loc["public-only", "label consistency"] == "-"
    # a table from runs that predate the metric (no such column in dvc exp show) still builds
    assert q.aggregate(pd.DataFrame(runs).drop(columns="label_consistency"), row_of, {}).set_index("setting").loc[
        "epsilon 10", "label consistency"] == "-"
    assert t.loc["real private train data", "CNN accuracy %"] == "96.0" and "other" not in t["experiments"].str.cat()
    assert list(t.index) == ["public-only", "epsilon 10", "real private train data"]
    # the real row: the reference stage's scores as the table's runs have them (protocol seeds), else the workspace's own
    with_real = pd.DataFrame([{**r, "real_cnn_accuracy": 0.95, "real_cnn_accuracy_std": 0.003, "real_mlp_accuracy": 0.92,
                               "real_logreg_accuracy": 0.89} if r["experiment"] == "q-eps10-run2" else r for r in runs])
    assert q.real_row(with_real, row_of, Path("no-such-file.json")) == {
        "real_cnn_accuracy": 0.95, "real_cnn_accuracy_std": 0.003, "real_mlp_accuracy": 0.92, "real_logreg_accuracy": 0.89}
    assert q.real_row(with_real[with_real["experiment"] != "q-eps10-run2"], row_of, Path("no-such-file.json")) == {}
    # every setting is scored with the protocol's 3 CNN seeds, whatever params.yaml's make-repro default; --set wins
    assert q.common_settings([]) == {"classifier.seeds": 3} != {"classifier.seeds": _params()["classifier"]["seeds"]}
    assert q.common_settings(["classifier.seeds=5", "sample.per_class=20"]) == {"classifier.seeds": 5, "sample.per_class": 20}
    # --rows: only the chosen rows' settings run and enter the table, the order kept
    assert [n for n, _, _ in q.only_rows(grid, ["dp"])] == [f"q-eps{e}-run{r}" for e in (1, 10) for r in (1, 2, 3)]
    assert [row for _, row, _ in q.only_rows(grid, ["non-private", "public-only"])] == ["public-only", "non-private"]


def test_benchmark_tables_start_with_the_exact_command_and_commit():
    import datetime
    import subprocess

    argv = ["--runs", "3", "--set", "sample.steps=25,ldm.steps=2100", "--step-figure", "LDM 0.62 s"]
    line = _benchmark("provenance").provenance("quality.py", argv, datetime.datetime(2026, 11, 24, 8, 5, tzinfo=datetime.timezone.utc))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # the command can be pasted back into a shell as is: the argument with spaces stays one argument
    assert line.startswith("`python benchmarks/quality.py --runs 3 --set sample.steps=25,ldm.steps=2100 --step-figure 'LDM 0.62 s'`")
    assert f"commit {commit}," in line and "2026-11-24 08:05 UTC" in line
    # and on which processor: timings and trained weights depend on its instruction set
    assert f"({_benchmark('provenance').cpu()})" in line
    import os
    from unittest import mock
    with mock.patch.dict(os.environ, {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}):
        held = _benchmark("provenance").cpu()
    assert held.endswith("held by ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"), held
    with mock.patch.dict(os.environ, {k: "" for k in _benchmark("provenance").ISA_CAPS}):
        assert "held by" not in _benchmark("provenance").cpu()
    # a script that ran another commit (repro_time.py's clone, while HEAD moved on) names that one, not HEAD
    ran = _benchmark("provenance").provenance("repro_time.py", [], datetime.datetime(2026, 12, 3, 12, 49), commit="abc1234")
    assert "commit abc1234," in ran and f"commit {commit}," not in ran
    # the commit is the one the process started at: HEAD is not read again when the table is written
    prov = _benchmark("provenance")
    prov.subprocess = None  # any later git call would fail
    assert f"commit {commit}," in prov.provenance("quality.py", [], datetime.datetime(2026, 12, 3, 13, 0))


def test_pretraining_sweep_reports_what_the_label_buys_on_public_latents():
    import torch
    import yaml

    from helpers import ROOT, merge

    s = _benchmark("pretrain_ldm_sweep")
    assert s.parse_variant("fast:ldm.lr=0.004,ldm.steps=3") == ("fast", {"ldm.lr": 0.004, "ldm.steps": 3})
    assert s.parse_variant("default:") == ("default", {})
    with pytest.raises(SystemExit, match="name:key=value"):
        s.parse_variant("ldm.lr=0.004")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load((ROOT / "tests/tiny_params.yaml").read_text()))
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(64, 4, 4, 4, generator=g), torch.randn(20, 4, 4, 4, generator=g)
    y, yt = torch.arange(64) % 10, torch.arange(20) % 10
    r = s.run_variant(params, {"ldm.steps": 2}, z, y, zt, yt, seed=0)
    assert r["steps"] == 2 and r["examples"] == 2 * r["batch_size"]
    assert r["label_gain"] == pytest.approx(r["heldout_loss_null"] - r["heldout_loss"])
    assert r["heldout_loss"] != r["heldout_loss_null"]  # the null class is a different input


def test_finetune_sweep_runs_only_on_a_public_proxy_and_its_seeded_variants_are_comparable(tmp_path):
    import numpy as np
    import torch
    import yaml

    from dpldm.config import load_section, to_dict
    from dpldm.models import build_ldm
    from helpers import ROOT, merge
    from stages.common import save_model

    s = _benchmark("finetune_sweep")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load((ROOT / "tests/tiny_params.yaml").read_text()))
    with pytest.raises(SystemExit, match="public proxy"):
        s.check_public(params)  # the embedded default's private set: refused
    assert s.check_public(merge(params, {"data": {"private": {"source": "digits8x8"}}})) == "digits8x8"
    cfg = load_section(params, "ldm")
    torch.manual_seed(0)
    model = build_ldm(cfg, latent_channels=4, latent_size=4)
    save_model(tmp_path / "ldm", state_dict=model.state_dict(), config=to_dict(cfg), extra={"latent_shape": [4, 4, 4]})
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(120, 4, 4, 4, generator=g), torch.randn(20, 4, 4, 4, generator=g)
    y, yt = torch.arange(120) % 10, torch.arange(20) % 10
    over = {"finetune.epochs": 1, "finetune.batch_size": 40, "finetune.physical_batch_size": 40}
    a, b = (s.run_variant(params, over, str(tmp_path / "ldm"), z, y, zt, yt, seed=3) for _ in range(2))
    assert a["private"] and 0 < a["epsilon"] <= 10 and a["noise_multiplier"] > 0 and a["steps"] == 3
    assert a["heldout_loss"] == b["heldout_loss"]  # seeded noise: the same variant gives the same model
    c = s.run_variant(params, {**over, "finetune.private": False}, str(tmp_path / "ldm"), z, y, zt, yt, seed=3)
    assert not c["private"] and c["epsilon"] == float("inf") and c["heldout_loss"] != a["heldout_loss"]
    # Adam's second moment over the DP noise's variance: positive quantiles in order under DP, none without
    assert 0 < a["v_over_noise_p01"] <= a["v_over_noise_p50"] <= a["v_over_noise_p99"] < float("inf")
    assert all(np.isnan(c[f"v_over_noise_p{q:02d}"]) for q in (1, 50, 99))
    # the benchmark-only probe: parameter groups beyond the DP selection, unfrozen and trained under the same DP loop
    from dpldm.privacy import select_trainable
    m = build_ldm(cfg, latent_channels=4, latent_size=4)
    sel = select_trainable(m, mode="attention", layers=(1, 2), train_embedder=True)
    wider = s.with_extra(m, sel, ("norms", "io"))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert list(wider.names) == names and set(sel.names) < set(names)  # named_parameters order, a superset
    assert {n for n in names if n not in sel.names} == {n for n, _ in m.named_parameters() if ".attentions." not in n and (
        "norm" in n or n.startswith(("unet.conv_in.", "unet.conv_out.")))}
    with pytest.raises(SystemExit, match="unknown group"):
        s.with_extra(m, sel, ("ff",))
    d = s.run_variant(params, over, str(tmp_path / "ldm"), z, y, zt, yt, seed=3, extra=("norms",))
    assert d["trainable_params"] > a["trainable_params"] and d["heldout_loss"] != a["heldout_loss"]
    s.write_rows(tmp_path / "out" / "sweep", [a, c])  # the CSV the script writes: one row per run
    assert list(pd.read_csv(tmp_path / "out" / "sweep.csv")["private"]) == [True, False]
    np.savez(tmp_path / "l.npz", train_latents=z.numpy(), train_labels=y.numpy(), test_latents=zt.numpy(), test_labels=yt.numpy())
    assert all(torch.equal(u, v) for u, v in zip(s.load_splits(str(tmp_path / "l.npz")), (z, y, zt, yt), strict=True))


def test_coverage_cuts_every_set_to_the_same_stratified_size():
    import numpy as np

    c = _benchmark("coverage")
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2, 0])
    images = np.arange(len(labels))[:, None, None, None].astype(np.uint8)
    x, y = c.stratified(images, labels, 6)
    assert list(y) == [0, 0, 1, 1, 2, 2] and list(x[:, 0, 0, 0]) == [0, 2, 1, 3, 6, 7]  # the first two of each class
    with pytest.raises(SystemExit, match=r"classes \[1, 2\] have fewer"):
        c.stratified(images, labels, 12)  # 4 per class: classes 1 and 2 hold only 3


def test_rescoring_refuses_keys_that_would_train_the_dp_model_again(tmp_path):
    from pipeline.boundary import read_stages
    from pipeline.sweep import check_rescore_keys, upstream_params

    stages = read_stages(Path(__file__).resolve().parents[1])
    keys = upstream_params(stages)
    # dp_finetune's own params and those of every stage before it (found through deps and outs), not the later ones'
    assert {"finetune", "ldm", "ae", "data.private", "runtime.seeds.pretrain_ae"} <= keys
    assert not any(k.startswith(("sample", "fid", "classifier", "runtime.seeds.sample")) for k in keys)
    check_rescore_keys({"sample.per_class": 1000, "classifier.cnn_epochs": 16, "runtime.seeds.sample": 2}, stages)
    for key in ("finetune.epsilon", "finetune", "ldm.lr", "runtime.threads", "runtime", "data.private.n_train"):
        with pytest.raises(SystemExit, match=re.escape(key)):
            check_rescore_keys({key: 1}, stages)
    q = _benchmark("quality")
    grid = q.settings([10.0], 2, {})
    pairs = q.rescored(grid, "pc1000", {"sample.per_class": 1000})
    assert [(b, n) for b, n, _ in pairs] == [(g[0], g[0] + "-pc1000") for g in grid]
    assert all(o == {"sample.per_class": 1000} for _, _, o in pairs)  # the base runs' own params come with exp apply
    with pytest.raises(SystemExit, match="--rescore"):
        q.rescored(grid, "bad tag", {})
    # the table is built from the re-scored runs, not their bases: main() with the sweep and the comparison stubbed
    seen = {}
    q.rescore_sweep = lambda pairs, rerun, code: seen.setdefault("pairs", pairs) and seen.setdefault("code", code)
    q.comparison = lambda names: seen.setdefault("names", names) and pd.DataFrame(
        [{"experiment": n, "cnn_accuracy": 0.5, "cnn_accuracy_std": 0.0, "epsilon_spent": None, "fid_domain": 1.0,
          "mlp_accuracy": 0.4, "logreg_accuracy": 0.3, "label_consistency": 0.5} for n in names])
    q.main(["--rescore", "t1", "--runs", "1", "--epsilons", "10", "--set", "sample.per_class=7", "--out", str(tmp_path / "q")])
    nonprivate = q.nonprivate_name(q.NONPRIVATE)  # the default: the non-private row's own schedule
    assert seen["names"] == ["q-public-only-t1", "q-eps10-run1-t1", f"{nonprivate}-t1"]
    assert [b for b, _, _ in seen["pairs"]] == ["q-public-only", "q-eps10-run1", nonprivate]
    assert seen["code"] == "experiment"  # the default: the experiment's own code
    assert f"own schedule: {q.NONPRIVATE}" in (tmp_path / "q.md").read_text()
    seen.clear()  # an empty --nonprivate-set: the DP defaults, under the old name
    q.main(["--rescore", "t1", "--runs", "1", "--epsilons", "10", "--nonprivate-set", "--out", str(tmp_path / "q")])
    assert seen["names"][-1] == "q-nonprivate-t1"
    for bad in ("finetune.layers=[4,7]", "ldm.steps=2000", "finetune.private=true"):  # the same selection, same model
        with pytest.raises(SystemExit, match=re.escape(bad.split("=")[0])):
            q.main(["--runs", "1", "--epsilons", "10", "--nonprivate-set", bad, "--out", str(tmp_path / "q")])
    assert "q-eps10-run1-t1" in (tmp_path / "q.md").read_text() and "q-eps10-run1 " not in (tmp_path / "q.md").read_text()
    seen.clear()  # --rows dp: the DP runs only
    q.main(["--rescore", "t2", "--rows", "dp", "--runs", "2", "--epsilons", "10", "--out", str(tmp_path / "q")])
    assert seen["names"] == ["q-eps10-run1-t2", "q-eps10-run2-t2"]


def test_rescoring_starts_after_the_dp_release_and_never_runs_the_audit():
    from pipeline.boundary import read_stages, stage_paths
    from pipeline.sweep import TARGETS, ancestors, rescore_starts

    stages = read_stages(Path(__file__).resolve().parents[1])
    model = stage_paths(stages, "dp_finetune")["model"]
    starts = rescore_starts(stages, model)
    assert starts == ["sample"]  # reads the release on the way to the scores; the audit (its own DP run) does not
    assert "dp_finetune" not in starts and all("dp_finetune" in ancestors(stages, t) for t in TARGETS)
    assert {"prepare_private", "encode_private", "pretrain_ldm", "dp_finetune"} <= ancestors(stages, "sample")


def test_pretrain_step_figure_says_when_and_where_it_was_measured(tmp_path, monkeypatch):
    """The day's step figure is quoted beside every time: its file starts with the command, commit and date."""
    out = tmp_path / "ps.md"
    import torch

    sets = f"ae.batch_size=4,ldm.batch_size=4,ldm.attention_head_dim=2,ldm.ff_mult=2,runtime.threads={torch.get_num_threads()}"
    argv = ["--steps", "1", "--set", sets,
            "--out", str(out)]  # the worker's thread count: main() sets it in this process
    ps = _benchmark("pretrain_step")
    heads, build = [], ps.build_ldm
    monkeypatch.setattr(ps, "build_ldm", lambda cfg, **kw: heads.append((cfg.attention_head_dim, cfg.ff_mult)) or build(cfg, **kw))
    ps.main(argv)
    # the overridden heads and feed-forward for its own row, the day figure's pinned ones for the last
    assert heads == [(2, 2), (ps.DAY_FIGURE_HEADS, ps.DAY_FIGURE_FF_MULT)]
    first, _, rest = out.read_text().partition("\n")
    assert first.startswith("`python benchmarks/pretrain_step.py --steps 1 --set ae.batch_size=4,ldm.batch_size=4")
    assert "commit" in first and "UTC" in first
    rows = [r for r in rest.splitlines() if r.startswith("| pretrain_")]
    assert [r.split("|")[2].strip() for r in rows] == ["4", "4", "4", "192"]  # the overridden batch sizes were timed,
    assert rows[-1].startswith("| pretrain_ldm (SDPA cross-attention: the day figure)")  # but the day figure keeps
    # its batch whatever params.yaml says: the same figure across days
    assert all(r.split("|")[5].strip() == "0" for r in rows)  # no compile row, no one-off cost, unless --compile


def test_repro_time_reads_stage_times_day_figures_and_appends_rows_to_one_table():
    r = _benchmark("repro_time")
    # process-list samples: nothing, then prepare_public, prepare_private (seen once), pretrain_ae, nothing between
    seen = [(100.0, []), (102.0, ["prepare_public"]), (110.0, ["prepare_private"]), (112.0, ["pretrain_ae"]),
            (130.0, []), (132.0, ["pretrain_ae"])]
    assert r.stage_durations(seen, 95.0, 140.0) == [("bootstrap", 7.0), ("prepare_public", 8.0), ("prepare_private", 2.0),
                                                    ("pretrain_ae", 28.0)]
    assert r.stage_durations([], 0.0, 5.0) == [("bootstrap", 5.0)]
    assert r.STAGE_RE.search("/x/python -m stages.dp_finetune --in ldm=m").group(1) == "dp_finetune"
    table = ("| stage | batch | s / step |\n|---|---:|---:|\n| pretrain_ae (contiguous) | 64 | 0.22 |\n"
             "| pretrain_ldm | 128 | 0.26 |\n| pretrain_ldm (SDPA cross-attention: the day figure) | 192 | 0.43 |\n")
    assert r.parse_day_figure(table) == 0.43 and r.parse_day_figure("no table") is None
    text = r.append_row("", "| a | row 1 |", "`python benchmarks/repro_time.py` run 1", 2.0)
    text = r.append_row(text, "| b | row 2 |", "`python benchmarks/repro_time.py --rev b` run 2", 2.0)
    lines = text.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    assert rows == list(range(rows[0], rows[0] + 4))  # header, rule, two rows: one unbroken table
    assert lines[rows[-2]] == "| a | row 1 |" and lines[rows[-1]] == "| b | row 2 |"
    assert lines[-2:] == ["- `python benchmarks/repro_time.py` run 1", "- `python benchmarks/repro_time.py --rev b` run 2"]


def test_repro_time_rows_read_back_and_the_plot_fits_minutes_per_day_figure(tmp_path):
    import datetime

    r = _benchmark("repro_time")
    started = datetime.datetime(2026, 12, 4, 1, 2)
    stages = [("bootstrap", 14.0), ("pretrain_ae", 225.0)]
    clf, fid = {"cnn_accuracy": 0.902, "cnn_accuracy_std": 0.002}, {"label_consistency": 0.833, "fid_domain": 53.8}
    rows = [r.format_row("aaa1111", started, 0.5, 0.5, 1200.0, 0, stages, 9.996, clf, fid),  # 40 min per s/step
            r.format_row("bbb2222", started, 0.9, 1.1, 2400.0, 0, stages, 9.996, clf, fid),  # 40 again
            r.format_row("ccc3333", started, None, 0.3, 60.0, 2, stages, None, {}, {}),     # failed: not fitted
            r.format_row("ddd4444", started, None, None, 900.0, 0, stages, None, {}, {})]   # no day figure: not fitted
    text = r.append_row("", rows[0], "`python benchmarks/repro_time.py` run 1", 2.0)
    for i, row in enumerate(rows[1:], 2):
        text = r.append_row(text, row, f"`python benchmarks/repro_time.py` run {i}", 2.0)
    got = r.parse_rows(text)
    assert [g["commit"] for g in got] == ["aaa1111", "bbb2222", "ccc3333", "ddd4444"]  # header and commands skipped
    assert got[0] == {"commit": "aaa1111", "started": "2026-12-04 01:02", "before": 0.5, "after": 0.5, "seconds": 1200,
                      "exit": 0}
    assert (got[2]["before"], got[2]["after"], got[2]["exit"]) == (None, 0.3, 2)
    assert r.day_mean(got[1]) == pytest.approx(1.0) and r.day_mean(got[2]) == 0.3 and r.day_mean(got[3]) is None
    assert r.minutes_per_day_figure(got) == pytest.approx(40.0)
    got[1]["seconds"] = 3000  # 50 min at 1.0: the fit is (0.5 * 20 + 1.0 * 50) / (0.25 + 1.0) = 48
    assert r.minutes_per_day_figure(got) == pytest.approx(48.0)
    assert r.minutes_per_day_figure(got[2:]) is None
    png = tmp_path / "repro_time.png"
    r.plot(got, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --since: the runs from that commit on are the current defaults', fitted apart
    assert [g["commit"] for g in r.runs_since(got, "bbb")] == ["bbb2222", "ccc3333", "ddd4444"]
    assert r.minutes_per_day_figure(r.runs_since(got, "bbb2222")) == pytest.approx(50.0)
    with pytest.raises(SystemExit, match="--since zzz"):
        r.runs_since(got, "zzz")
    r.plot(got, png, since="bbb")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # labels only where they can be read: two runs within 0.04 s/step and 1.5 min of each other go unlabelled
    ok = [g for g in got if r.day_mean(g) is not None]
    assert r.crowded_runs(ok) == []
    near = {**got[0], "commit": "eee5555", "before": 0.52, "after": 0.52, "seconds": 1260}  # 0.02 s/step, 1 min away
    far = {**got[0], "commit": "fff6666", "before": 0.52, "after": 0.52, "seconds": 1500}   # 5 min away
    assert [g["commit"] for g in r.crowded_runs(ok + [near, far])] == ["aaa1111", "eee5555"]


def test_repro_time_profile_runs_merge_into_the_clone_and_go_to_their_own_table(tmp_path):
    """--profile: the profile is merged into the clone's params.yaml by the clone's own apply_profile.py (the checkout's
    params.yaml untouched), and its runs go to repro_time_<profile>.md unless --out says otherwise."""
    import shutil

    import yaml
    from helpers import ROOT

    r = _benchmark("repro_time")
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", clone / "params.yaml")
    shutil.copy(ROOT / "scripts" / "apply_profile.py", clone / "scripts" / "apply_profile.py")
    profile = ROOT / "benchmarks" / "profiles" / "fast.yaml"
    before = (ROOT / "params.yaml").read_text()
    r.apply_profile(clone, profile)
    merged, base, over = (yaml.safe_load(p.read_text()) for p in (clone / "params.yaml", ROOT / "params.yaml", profile))
    assert over and all(merged[sec][k] == v for sec, kv in over.items() for k, v in kv.items())
    assert any(base[sec][k] != v for sec, kv in over.items() for k, v in kv.items())  # the profile changes something
    assert merged["finetune"]["epsilon"] == base["finetune"]["epsilon"]               # and leaves the rest
    assert (ROOT / "params.yaml").read_text() == before
    bad = tmp_path / "bad.yaml"
    bad.write_text("ldm: {stepz: 5}\n")
    with pytest.raises(subprocess.CalledProcessError):
        r.apply_profile(clone, bad)
    assert r.results_path(None, profile) == Path("benchmarks/results/repro_time_fast.md")
    assert r.results_path(None, None) == Path("benchmarks/results/repro_time.md")
    assert r.results_path("x/y.md", profile) == Path("x/y.md")


def test_stage_imports_lists_dvc_yamls_stages_and_names_the_heavy_libraries_an_import_loads(tmp_path):
    """benchmarks/stage_imports.py: the stage modules are dvc.yaml's own, and a fresh import reports what it loaded
    (prepare_public: none of the heavy libraries; reference: torch but not torch-fidelity, which only score_fid's FID
    needs)."""
    b = _benchmark("stage_imports")
    stages = b.stage_modules()
    assert stages[:2] == ["prepare_public", "prepare_private"] and len(stages) == len(set(stages))
    assert {"pretrain_ae", "dp_finetune", "sample", "score_classifier", "reference"} <= set(stages)
    seconds, mods = b.one_import("prepare_public")
    assert seconds > 0 and mods == []
    _, mods = b.one_import("reference")
    assert "torch" in mods and "torch_fidelity" not in mods and "diffusers" not in mods
    with pytest.raises(SystemExit, match="--rounds 1"):
        b.main(["--rounds", "1", "--out", str(tmp_path / "x.md")])


def test_ldm_shape_ab_times_every_stage_per_variant_and_states_ratios_against_the_first(tmp_path, monkeypatch):
    """benchmarks/ldm_shape_ab.py: three timings per variant and process, ratios against the first variant. Its
    processes run here in this one (the same ``--one`` code path) to keep the test cheap."""
    ab = _benchmark("ldm_shape_ab")
    calls, run = [], subprocess.run

    def in_process(cmd, **kw):
        if "--one" not in cmd:  # provenance's git calls
            return run(cmd, **kw)
        over = json.loads(cmd[cmd.index("--one") + 1])
        calls.append(over["ldm.attention_head_dim"])
        r = ab.one(over, int(cmd[cmd.index("--steps") + 1]), int(cmd[cmd.index("--samples") + 1]))
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(r) + "\n", stderr="")

    monkeypatch.setattr(ab.subprocess, "run", in_process)
    import torch

    tiny = (f"runtime.threads={torch.get_num_threads()},"  # in this process: keep the worker's thread count
            "ldm.batch_size=4,finetune.batch_size=6,finetune.physical_batch_size=6,sample.steps=2,sample.batch_size=4")
    out = tmp_path / "ab.md"
    ab.main(["--variant", f"h8:ldm.attention_head_dim=8,{tiny}", "--variant", f"h2:ldm.attention_head_dim=2,{tiny}",
             "--rounds", "2", "--steps", "1", "--samples", "6", "--out", str(out)])
    assert calls == [8, 2, 8, 2]  # alternated, round by round
    text = out.read_text()
    assert "ldm_shape_ab.py" in text.splitlines()[0] and "UTC" in text.splitlines()[0]
    rows = {r.split("|")[1].strip(): r.split("|") for r in text.splitlines() if r.startswith("| h")}
    assert set(rows) == {"h8", "h2"}
    assert [c.strip() for c in rows["h8"][6:9]] == ["1.00x", "1.00x", "1.00x"]  # the baseline against itself
    times = [[float(t) for t in c.split(",")] for c in rows["h2"][3:6]]
    assert all(len(t) == 2 and min(t) > 0 for t in times)  # one positive time per process and kind
    with pytest.raises(SystemExit):  # one variant is refused: nothing to compare
        ab.main(["--variant", "h8:", "--out", str(tmp_path / "none.md")])
    assert not (tmp_path / "none.md").exists()


def test_with_audit_turns_the_opt_in_audit_on_in_each_experiment_and_only_then(tmp_path, monkeypatch):
    import pipeline.sweep as sw

    (tmp_path / "params.yaml").write_text("finetune: {epsilon: 10}\naudit: {enabled: false}\n")
    calls = []
    monkeypatch.setattr(sw, "dvc", lambda *args, repo: calls.append(args))
    for audit in (False, True):
        calls.clear()
        sw.run_sweep([("e1", {"finetune.epsilon": 1})], repo=str(tmp_path), audit=audit)
        (run,) = [c for c in calls if c[:2] == ("exp", "run")]
        assert "finetune.epsilon=1" in run
        assert ("audit.enabled=true" in run) == audit and ("audit" in run) == audit  # the flag and the stage as a target
    assert "enabled: false" in (tmp_path / "params.yaml").read_text()  # the workspace's params stay as they were


def test_alternated_takes_turns_and_ratio_rows_compare_per_example_medians(monkeypatch):
    """pretrain_step.alternated builds a fresh step per variant and round, the variants taking turns within a round;
    ratio_rows reports each variant's median per example against the reference variant's ("-" without one)."""
    ps = _benchmark("pretrain_step")
    built = []
    variants = [(name, batch, (lambda name=name: built.append(name) or (lambda: None))) for name, batch in
                (("a", 2), ("b", 4))]
    fake = iter([1.0, 4.0, 3.0, 2.0, 2.0, 6.0])  # a: 1, 3, 2 (median 2); b: 4, 2, 6 (median 4)
    monkeypatch.setattr(ps, "timed", lambda step, n: (step(), next(fake))[1])
    times = ps.alternated(variants, 3, 1, "step")
    assert built == ["a", "b"] * 3 and times == {"a": [1.0, 3.0, 2.0], "b": [4.0, 2.0, 6.0]}
    rows = [r.split("|")[1:-1] for r in ps.ratio_rows(variants, times, "a")]
    assert [c.strip() for c in rows[0]] == ["a", "1.000, 3.000, 2.000", "1000.00", "1.00x"]
    assert [c.strip() for c in rows[1]] == ["b", "4.000, 2.000, 6.000", "1000.00", "1.00x"]  # 4 s / 4 = 2 s / 2
    assert [r.split("|")[4].strip() for r in ps.ratio_rows(variants, times, "c")] == ["-", "-"]
    assert ps.ratio_rows(variants, {"a": [1.0], "b": [1.0]}, "a")[1].split("|")[4].strip() == "2.00x"


def test_ae_step_times_each_batch_and_the_native_convolutions_and_profiles_the_stage_step(tmp_path, monkeypatch):
    """benchmarks/ae_step.py: one time per variant and round (alternated), per-example ratios against params.yaml's
    batch, oneDNN switched off only for its own variant, and a profiler table."""
    import torch

    ae_step = _benchmark("ae_step")
    seen, make = [], ae_step.ae_step_fn
    monkeypatch.setattr(ae_step, "ae_step_fn", lambda cfg, batch, **kw: seen.append((batch, torch.backends.mkldnn.enabled))
                        or make(cfg, batch, **kw))
    out = tmp_path / "ae.md"
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    ae_step.main(["--batches", "2", "4", "--rounds", "2", "--steps", "1", "--profile-steps", "1",
                  "--set", f"ae.batch_size=4,runtime.threads={torch.get_num_threads()}", "--out", str(out)])
    # two rounds of (batch 2, batch 4, batch 4 without oneDNN), then the profiled step at the stage's batch
    assert seen == [(2, True), (4, True), (4, False)] * 2 + [(4, True)]
    text = out.read_text()
    assert text.splitlines()[0].startswith("`python benchmarks/ae_step.py --batches 2 4") and "UTC" in text
    rows = {r.split("|")[1].strip(): r.split("|") for r in text.splitlines() if r.startswith("| batch")}
    assert set(rows) == {"batch 2", "batch 4", "batch 4, PyTorch's own convolutions (oneDNN off)"}
    assert rows["batch 4"][4].strip() == "1.00x"  # the stage's batch against itself
    assert all(len(r[2].split(",")) == 2 for r in rows.values())  # one time per round
    assert "| `aten::" in text  # the profiler's operators


def test_sample_step_alternates_its_variants_and_its_alternatives_really_change_the_network(tmp_path, monkeypatch):
    """benchmarks/sample_step.py: one time per variant and round, ratios against sample.batch_size, the sampler /
    decoder split and a profiler table; its tanh-GELU variant changes the network's output (the patch takes hold) and
    its explicit-softmax self-attention leaves it equal up to float rounding (same function, another kernel)."""
    import torch

    sample_step = _benchmark("sample_step")
    from dpldm.config import LDMConfig, load_all
    from dpldm.models import build_ldm

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    import yaml
    cfg: LDMConfig = load_all(yaml.safe_load(Path("params.yaml").read_text()))["ldm"]
    nets = [build_ldm(cfg, latent_channels=4, latent_size=8).eval() for _ in range(3)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    sample_step.tanh_gelu(nets[1])
    sample_step.explicit_self_attention(nets[2])
    z, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        ref, tanh, explicit = (net(z, t, y) for net in nets)
    assert not torch.equal(ref, tanh) and torch.allclose(ref, tanh, atol=1e-2)
    assert torch.allclose(ref, explicit, atol=1e-5)
    from diffusers.models.attention_processor import Attention, AttnProcessor
    self_attn = [m for m in nets[2].modules() if isinstance(m, Attention) and not m.is_cross_attention]
    assert len(self_attn) == 7 and all(type(m.processor) is AttnProcessor for m in self_attn)

    seen, make = [], sample_step.forward_fn
    monkeypatch.setattr(sample_step, "forward_fn",
                        lambda net, batch, **kw: seen.append((batch, kw.get("bf16", False))) or make(net, batch, **kw))
    out = tmp_path / "sample.md"
    sample_step.main(["--batches", "2", "4", "--rounds", "2", "--forwards", "1", "--profile-forwards", "1",
                      "--set", f"sample.batch_size=4,sample.steps=2,runtime.threads={torch.get_num_threads()}", "--out", str(out)])
    # two rounds of (batch 2, batch 4, its three alternatives, the last under bf16), then the profiled forward
    assert seen == [(2, False), (4, False), (4, False), (4, False), (4, True)] * 2 + [(4, False)]
    text = out.read_text()
    assert text.splitlines()[0].startswith("`python benchmarks/sample_step.py --batches 2 4") and "UTC" in text
    from dpldm.diffusion import resolve_precision
    assert f"`sample.precision: auto` resolves to **{resolve_precision('auto', 'cpu')}**" in text
    rows = {r.split("|")[1].strip(): r.split("|") for r in text.splitlines() if r.startswith("| batch")}
    assert len(rows) == 5 and rows["batch 4"][4].strip() == "1.00x" and "batch 4, bf16 autocast (`sample.precision: bf16`)" in rows
    dec = {r.split("|")[1].strip(): r.split("|") for r in text.splitlines() if r.startswith("| AE decoder")}
    assert list(dec) == ["AE decoder, batch 4, fp32", "AE decoder, batch 4, bf16 autocast"]
    assert dec["AE decoder, batch 4, fp32"][4].strip() == "1.00x" and all(len(r[2].split(",")) == 2 for r in dec.values())
    assert all(len(r[2].split(",")) == 2 for r in rows.values())  # one time per round
    assert "sampler **" in text and "AE decoder **" in text and "| `aten::" in text


def test_quality_pool_tabulates_each_tables_dp_runs_and_all_of_them(tmp_path):
    import pandas as pd

    q = _benchmark("quality")
    cols = dict(epsilon_spent=9.99, cnn_accuracy_std=0.01, mlp_accuracy=0.8, logreg_accuracy=0.7, fid_domain=50.0,
                label_consistency=0.8)
    a = pd.DataFrame([dict(experiment=f"q-eps10-run{r}", epsilon_target=10.0, dp_release=True, cnn_accuracy=acc, **cols)
                      for r, acc in ((1, 0.89), (2, 0.91))]
                     + [dict(experiment="q-nonprivate", epsilon_target=10.0, dp_release=False, cnn_accuracy=0.96, **cols)])
    b = pd.DataFrame([dict(experiment="q-eps10-run1", epsilon_target=10.0, dp_release=True, cnn_accuracy=0.93, **cols),
                      dict(experiment="q-seeded", epsilon_target=10.0, dp_release=False, cnn_accuracy=0.99, **cols)])
    a.to_csv(tmp_path / "first_runs.csv", index=False)
    b.to_csv(tmp_path / "second_runs.csv", index=False)
    table = q.pooled([str(tmp_path / "first_runs.csv"), str(tmp_path / "second_runs.csv")]).set_index("setting")
    # non-private and seeded-noise runs are not DP releases; run names repeated across tables stay separate runs
    assert table.loc["epsilon 10, first", "CNN accuracy %"] == "90.0 ± 1.4"
    assert table.loc["epsilon 10, second", "CNN accuracy %"] == "93.0"
    assert table.loc["epsilon 10, pooled (2 tables)", "runs"] == "3"
    assert table.loc["epsilon 10, pooled (2 tables)", "CNN accuracy %"] == "91.0 ± 2.0"


def test_restore_head_code_keeps_the_applied_params_and_lock_and_restores_the_rest(tmp_path):
    """After `dvc exp apply` brought back an experiment's files, --rescore-code head restores every tracked file that
    differs from HEAD except params.yaml and dvc.lock; untracked files are left alone."""
    import subprocess

    from pipeline.sweep import rescore_sweep, restore_head_code

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)
    git("init", "-q")
    files = {"params.yaml": "a: 1\n", "dvc.lock": "x\n", "dpldm/sampling.py": "new = 1\n", "stages/sample.py": "s = 1\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "head")
    applied = {"params.yaml": "a: 2\n", "dvc.lock": "y\n", "dpldm/sampling.py": "old = 1\n", "stages/sample.py": "s = 0\n"}
    for name, text in applied.items():  # what exp apply leaves: the experiment's params, lock and code
        (tmp_path / name).write_text(text)
    (tmp_path / "scratch.txt").write_text("untracked")
    assert sorted(restore_head_code(str(tmp_path))) == ["dpldm/sampling.py", "stages/sample.py"]
    for name in ("params.yaml", "dvc.lock"):
        assert (tmp_path / name).read_text() == applied[name]
    for name in ("dpldm/sampling.py", "stages/sample.py"):
        assert (tmp_path / name).read_text() == files[name]
    assert (tmp_path / "scratch.txt").read_text() == "untracked"
    assert restore_head_code(str(tmp_path)) == []
    with pytest.raises(ValueError, match="newest"):
        rescore_sweep([], repo=str(tmp_path), code="newest")


def test_quality_merge_fills_only_rows_without_runs_here_and_only_from_the_same_public_models(tmp_path):
    import pandas as pd

    q = _benchmark("quality")
    grid = q.settings([1.0, 10.0], 2, {})
    row_of = {n: row for n, row, _ in grid}
    cols = dict(epsilon_spent=9.99, cnn_accuracy_std=0.01, mlp_accuracy=0.8, logreg_accuracy=0.7, fid_domain=50.0,
                label_consistency=0.8, public_ae="a1", public_ldm="l1")
    here = pd.DataFrame([dict(experiment="q-eps1-run1", cnn_accuracy=0.80, **cols),
                         dict(experiment="q-eps1-run2", cnn_accuracy=0.82, **cols),
                         dict(experiment="other", cnn_accuracy=0.1, **{**cols, "public_ae": "zz"})])
    here["public_models"] = q.public_models(here)
    there = pd.DataFrame([dict(experiment=f"q-eps10-run{r}", cnn_accuracy=acc, **cols) for r, acc in ((1, 0.90), (2, 0.92))]
                         + [dict(experiment="q-eps1-run1", cnn_accuracy=0.5, **cols)])  # a row run here: not merged
    there["public_models"] = q.public_models(there)
    there.to_csv(tmp_path / "elsewhere_runs.csv", index=False)
    df, rows = q.merged(here, row_of, [str(tmp_path / "elsewhere_runs.csv")])
    table = q.aggregate(df, rows, {}).set_index("setting")
    assert table.loc["epsilon 1", "CNN accuracy %"] == "81.0 ± 1.4" and table.loc["epsilon 1", "runs"] == "2"
    assert table.loc["epsilon 10", "CNN accuracy %"] == "91.0 ± 1.4"
    assert table.loc["epsilon 10", "experiments"] == "elsewhere:q-eps10-run1 elsewhere:q-eps10-run2"
    # runs on other public models, or a file that does not record them, are refused
    there.assign(public_ldm="l2").assign(public_models=lambda d: q.public_models(d)).to_csv(tmp_path / "other_runs.csv", index=False)
    with pytest.raises(SystemExit, match="other public models"):
        q.merged(here, row_of, [str(tmp_path / "other_runs.csv")])
    there.drop(columns="public_models").to_csv(tmp_path / "old_runs.csv", index=False)
    with pytest.raises(SystemExit, match="does not record"):
        q.merged(here, row_of, [str(tmp_path / "old_runs.csv")])
    with pytest.raises(SystemExit, match="one recorded pair"):
        q.merged(here.assign(public_models=["ae=a1 ldm=l1", "ae=a2 ldm=l1", ""]), row_of, [str(tmp_path / "elsewhere_runs.csv")])


def test_benchmark_outputs_keep_the_dots_of_their_stem():
    """provenance.with_ext: a --out stem with dots ("betas_0.9,0.999") keeps them, so that two stems differing after
    their last dot do not write the same file; a name with a table's extension has it replaced."""
    from pathlib import Path

    p = _benchmark("provenance")
    assert p.with_ext("out/betas_0.9,0.999", ".md") == Path("out/betas_0.9,0.999.md")
    assert p.with_ext("out/betas_0.9,0.99", ".md") != p.with_ext("out/betas_0.9,0.999", ".md")
    assert p.with_ext("benchmarks/results/finetune_sweep", ".csv") == Path("benchmarks/results/finetune_sweep.csv")
    assert p.with_ext("benchmarks/results/ae_variants.md", ".md") == Path("benchmarks/results/ae_variants.md")
    assert p.with_ext("x/table.csv", ".md") == Path("x/table.md")


def test_public_subspace_projection_spans_the_top_public_directions_and_residual_one_is_dp_sgd(tmp_path):
    import torch
    import yaml

    from dpldm.config import load_section, to_dict
    from dpldm.models import build_ldm
    from helpers import ROOT, merge
    from stages.common import save_model

    s = _benchmark("public_subspace_proxy")
    g = torch.randn(12, 50, generator=torch.Generator().manual_seed(0))
    v, lam = s.top_basis(g, 4)
    assert torch.allclose(v @ v.T, torch.eye(4), atol=1e-4)  # orthonormal rows
    _, sv, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.allclose(lam.float(), sv[:4] ** 2, rtol=1e-4)
    assert torch.allclose(v.T @ v, vh[:4].T @ vh[:4], atol=1e-4)  # the same subspace as the top right singular vectors
    assert s.captured(v, vh[1]) == pytest.approx(1, abs=1e-4) and s.captured(v, vh[6]) == pytest.approx(0, abs=1e-4)

    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load((ROOT / "tests/tiny_params.yaml").read_text()))
    cfg = load_section(params, "ldm")
    torch.manual_seed(0)
    model = build_ldm(cfg, latent_channels=4, latent_size=4)
    save_model(tmp_path / "ldm", state_dict=model.state_dict(), config=to_dict(cfg), extra={"latent_shape": [4, 4, 4]})
    r = torch.Generator().manual_seed(0)
    z, zt, zp = (torch.randn(n, 4, 4, 4, generator=r) for n in (120, 20, 60))
    y, yt, yp = torch.arange(120) % 10, torch.arange(20) % 10, torch.arange(60) % 10
    over = {"finetune.epochs": 1, "finetune.batch_size": 40, "finetune.physical_batch_size": 40}

    def run(**proj):
        return s.run_variant(params, over, {**s.PROJECTION_KEYS, "examples": 30, "refresh": 2, **proj}, str(tmp_path / "ldm"),
                             z, y, zt, yt, zp, yp, seed=3)
    base = run(rank=0)
    plain = _benchmark("finetune_sweep").run_variant(params, over, str(tmp_path / "ldm"), z, y, zt, yt, seed=3)
    assert base["heldout_loss"] == plain["heldout_loss"]  # rank 0: finetune_sweep's DP-SGD loop, the same noise
    identity = run(rank=8, residual=1.0)  # the projection with the whole residual kept is the identity
    assert identity["heldout_loss"] == pytest.approx(base["heldout_loss"], rel=1e-4)
    projected = run(rank=8)
    assert abs(projected["heldout_loss"] - base["heldout_loss"]) > 1e-4
    assert 0 < projected["proxy_mean_captured"] <= 1 and 0 < projected["public_mean_captured"] <= 1
    assert 0 < projected["public_rows_kept"] <= 1 and projected["steps"] == base["steps"] == 3
    mixed = run(mix=0.5, mix_examples=10)  # public gradients added to the released sum
    assert mixed["mix_s"] > 0 and abs(mixed["heldout_loss"] - base["heldout_loss"]) > 1e-4


def test_classifier_recipes_parses_its_arguments_and_tests_on_public_data_only(tmp_path, monkeypatch):
    import sys

    import numpy as np

    from helpers import ROOT
    from stages.common import write_images

    cr = _benchmark("classifier_recipes")
    assert cr.parse_recipe("affine:shift=0.0625,rotate=10,epochs=3") == ("affine", {"shift": 0.0625, "rotate": 10.0, "epochs": 3})
    assert cr.parse_recipe("none:") == ("none", {})
    for bad in ("affine:tilt=3", "affine:rotate=ten", ":shift=0.1"):
        with pytest.raises(SystemExit, match="--recipe"):
            cr.parse_recipe(bad)
    assert cr.parse_case("a=x/s.parquet@y/i.parquet:test") == ("a", ("x/s.parquet", None), ("y/i.parquet", "test"))
    with pytest.raises(SystemExit, match="--case"):
        cr.parse_case("a=x.parquet")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8)
    labels, split = np.arange(60) % 10, ["train"] * 40 + ["test"] * 20
    for name, source in (("public", "fontdigits"), ("private", "mnist5k")):
        write_images(tmp_path / f"{name}.parquet", images=images, labels=labels, split=split, source_index=np.arange(60),
                     class_names=[str(i) for i in range(10)], source=source)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "recipes"
    argv = ["classifier_recipes.py", "--case", f"t={tmp_path}/public.parquet:train@{tmp_path}/private.parquet:test",
            "--recipe", "none:epochs=1", "--seeds", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="not public"):  # invariant 7: never chosen on the private test split
        cr.main()
    argv[2] = f"t={tmp_path}/public.parquet:train@{tmp_path}/public.parquet:test"
    argv[4] = "affine:shift=0.1,rotate=10,epochs=1"
    cr.main()
    row = pd.read_csv(out.with_suffix(".csv")).iloc[0]
    assert (row["case"], row["recipe"], row["epochs"], row["n_test"]) == ("t", "affine", 1, 20) and 0 <= row["test_accuracy"] <= 1
    assert "| t | affine | 0.1 | 10 | 0 | 1 |" in out.with_suffix(".md").read_text()


def test_rescoring_adds_only_keys_the_code_has_and_the_experiment_lacks():
    from pipeline.sweep import exp_run_args, keys_to_add, missing_keys

    experiment = {"classifier": {"cnn_epochs": 8}, "sample": {"steps": 10}}
    head = {"classifier": {"cnn_epochs": 8, "cnn_augment_shift": 0.0}, "sample": {"steps": 10}}
    assert missing_keys(head, ["classifier.cnn_epochs", "classifier.nope", "nope.x", "sample.steps.deeper"]) == {
        "classifier.nope", "nope.x", "sample.steps.deeper"}
    overrides = {"classifier.cnn_augment_shift": 0.0625, "sample.steps": 25}
    added = keys_to_add(experiment, head, overrides)
    assert added == {"classifier.cnn_augment_shift"}
    args = exp_run_args("e-aug", overrides, added=added)
    assert "++classifier.cnn_augment_shift=0.0625" in args and "sample.steps=25" in args
    assert exp_run_args("e", {"finetune.layers": [1, 7]}) == ["exp", "run", "-n", "e", "-S", "finetune.layers=[1, 7]"]
    with pytest.raises(SystemExit, match="classifier.cnn_agument_shift"):  # misspelt: in neither params file
        keys_to_add(experiment, head, {"classifier.cnn_agument_shift": 0.1})


def test_proxy_tradeoff_refuses_private_data_and_keeps_the_first_samples_of_each_class(tmp_path):
    import numpy as np
    import yaml

    from helpers import ROOT

    s = _benchmark("proxy_tradeoff")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(SystemExit, match="public proxy"):
        s.check_public(params, tmp_path / "params.yaml")  # the embedded default's private set: refused
    params["data"]["private"]["source"] = "digits8x8"
    s.check_public(params, tmp_path / "params.yaml")
    y = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1])
    keep = s.first_per_class(y, 2)
    assert keep.tolist() == [0, 1, 2, 3, 4, 6]  # in row order, two per class, the first ones drawn
    with pytest.raises(SystemExit, match="class 0 has 3 samples"):
        s.first_per_class(y, 4)
    assert s.parse_release("dp10/1=x.parquet") == ("dp10", 1, (Path.cwd() / "x.parquet").resolve())
    with pytest.raises(SystemExit, match="expected name/REPEAT"):
        s.parse_release("dp10=x.parquet")
    assert s.parse_variant("dp10:finetune.epochs=10") == ("dp10", {"finetune.epochs": 10})
    with pytest.raises(SystemExit, match="no '/'"):
        s.parse_variant("a/b:finetune.epochs=10")


def test_eval_time_times_each_classifier_of_both_stages_and_writes_no_score(tmp_path, monkeypatch):
    import numpy as np
    import yaml

    from helpers import ROOT
    from stages.common import write_images

    params = _params()
    params["classifier"].update(cnn_epochs=1, mlp_max_iter=2, mlp_hidden=8)
    params["fid"]["domain_epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (60, 32, 32, 1), dtype=np.uint8), np.arange(60) % 10
    for rel, split in (("data/samples/samples.parquet", ["train"] * 60), ("data/private/images.parquet", ["train"] * 40 + ["test"] * 20)):
        (tmp_path / rel).parent.mkdir(parents=True)
        write_images(tmp_path / rel, images=images, labels=labels, split=split, source_index=np.arange(60),
                     class_names=[str(i) for i in range(10)], source="mnist5k")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "eval_time.md"
    _benchmark("eval_time").main(["--workspace", str(tmp_path), "--rounds", "1", "--out", str(out)])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "part" not in line]
    assert len(rows) == 7  # CNN, MLP, logreg on each set, and the domain extractor on the private train split
    assert "| synthetic samples (score_classifier): one CNN seed | 50 |" in text  # 60 minus the validation split (one per class at least)
    assert "| private train split (reference, real row): domain extractor | 30 |" in text  # the train split, less its validation split
    assert "accuracy" not in text.lower()  # times only: nothing scored on the private data


def test_attention_kernels_compared_compute_the_same_attention():
    import torch

    ks = _benchmark("attention_kernels").kernels()
    q, k, v = (torch.randn(3, 8, 64, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = ks["SDPA (flash, default)"](q, k, v)
    for name, fn in ks.items():  # the timings compare one computation, not three
        torch.testing.assert_close(fn(q, k, v), ref, rtol=1e-5, atol=1e-5, msg=name)


def test_attention_kernels_stage_variant_swaps_only_self_attention_and_keeps_the_output():
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from dpldm.config import load_all
    from dpldm.models import OneTokenCrossAttnProcessor, build_ldm

    ak = _benchmark("attention_kernels")
    cfg = load_all(_params())["ldm"]
    torch.manual_seed(0)
    ref = build_ldm(cfg, latent_channels=4, latent_size=8).eval()
    z, t, y = torch.randn(6, 4, 8, 8), torch.randint(0, 1000, (6,)), torch.arange(6) % 10
    with torch.no_grad():
        want = ref(z, t, y)
    counts = {}
    for lowest_only in (False, True):
        net = build_ldm(cfg, latent_channels=4, latent_size=8).eval()
        net.load_state_dict(ref.state_dict())
        counts[lowest_only] = ak.explicit_self_attention(net, lowest_only=lowest_only)
        attn = [m for m in net.unet.modules() if isinstance(m, Attention)]
        assert sum(isinstance(m.processor, AttnProcessor) for m in attn) == counts[lowest_only]
        assert all(isinstance(m.processor, OneTokenCrossAttnProcessor) for m in attn if m.is_cross_attention)
        with torch.no_grad():  # the timing compares one computation: the same eps prediction up to float rounding
            torch.testing.assert_close(net(z, t, y), want, rtol=1e-4, atol=1e-5)
    # 7 self-attention modules in the default UNet, 4 of them at its lowest resolution (4x4 latents here: 2x2)
    assert counts == {False: 7, True: 4}
