"""Experiments across privacy budgets (and layer ranges) with ``dvc exp``, then one comparison.

    python -m pipeline.sweep --epsilons 1 5 10 [--layers 1-7 4-7] [--extra nonprivate:finetune.private=false]
                             [--set finetune.epochs=5 sample.per_class=200]

1. ``dvc repro`` of the shared upstream stages, once (so no experiment re-trains them);
2. one ``dvc exp run -S finetune.epsilon=E -S finetune.layers=[i,j]`` per setting, serially
   (one DVC lock per workspace);
3. a comparison built from ``dvc.api.exp_show()`` -- the same numbers ``dvc exp show`` prints:
   CSV + markdown table, and a privacy-utility plot (epsilon vs accuracy and vs FID, one line per
   layer range). ``sweep_flow`` does the same as a Prefect flow with a table artifact.

Every experiment is a separate release of a model trained on the same private data: their epsilons
add up (basic composition) if more than one is published.
"""
from __future__ import annotations

import argparse
import itertools
import re
import subprocess
from pathlib import Path

import pandas as pd
import yaml

from dpldm.ledger import Ledger
from pipeline.boundary import read_stages, stage_needs, stage_paths

UPSTREAM = ("pretrain_ldm", "encode_private", "reference")
TARGETS = ("score_fid", "score_classifier")  # what an experiment reproduces; the audit only with --with-audit
REAL = ("real_cnn_accuracy", "real_cnn_accuracy_std", "real_mlp_accuracy", "real_logreg_accuracy")  # the reference stage's scores
COLUMNS = {  # table column -> dvc exp show column (metrics file:key, or params key); "ledger:" = the ledger's file
    "epsilon_target": "finetune.epsilon", "layers": "finetune.layers", "mode": "finetune.mode",
    "lora_rank": "finetune.lora.rank", **{key: "ledger:" + key for key in Ledger.SWEEP},
    "fid_domain": "fid_domain", "kid_domain_mean": "kid_domain_mean", "label_consistency": "label_consistency",
    "cnn_accuracy": "cnn_accuracy",
    "cnn_accuracy_std": "cnn_accuracy_std",
    "mlp_accuracy": "mlp_accuracy", "logreg_accuracy": "logreg_accuracy",
    **{key: key for key in REAL},
}


def visible_output(text: str, *, in_flow_run: bool) -> str:
    """What of a dvc command's output is printed. Inside a Prefect flow run, prints go to the server's log
    (``log_prints``), off the private side: only DVC's own control and error lines, never a stage's output
    (an experiment runs private stages too). Outside, the tail of everything (this machine's terminal)."""
    from pipeline.flow import log_line

    if in_flow_run:
        return "\n".join(line for line in text.splitlines() if log_line(line, private_stage=True))
    return text[-3000:]


def dvc(*args: str, repo: str = ".") -> subprocess.CompletedProcess:
    from prefect.context import FlowRunContext

    from pipeline.flow import dvc_bin, stage_env

    proc = subprocess.run([dvc_bin(), *args], cwd=repo, env=stage_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(visible_output(proc.stdout, in_flow_run=FlowRunContext.get() is not None))
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode})")
    return proc


def parse_assignments(text: str) -> dict:
    """"key=value,key=value" (a value may be a YAML list with commas: ``finetune.layers=[4,7]``) -> {key: value}."""
    out = {}
    for part in re.split(r",(?![^\[]*\])", text):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad assignment {part!r} in {text!r}: expected key=value, like finetune.epsilon=5")
        out[key.strip()] = yaml.safe_load(value)
    return out


def settings_of(epsilons: list[float], layers: list[str], extra: list[str], common: dict | None = None) -> list[tuple[str, dict]]:
    """[(experiment name, {param: value})]; ``layers`` like "1-7"; ``extra`` like "name:key=value,key=value";
    ``common`` overrides go into every setting (a setting's own value wins)."""
    out = []
    for eps, lay in itertools.product(epsilons, layers or [None]):
        s = {"finetune.epsilon": eps}
        name = f"eps{eps:g}"
        if lay:
            i, j = (int(v) for v in lay.split("-"))
            s["finetune.layers"] = [i, j]
            name += f"-layers{i}-{j}"
        out.append((name.replace(".", "p"), s))
    for item in extra:
        name, sep, assigns = item.partition(":")
        if not sep or not name:
            raise ValueError(f"bad --extra {item!r}: expected name:key=value,key=value")
        out.append((name, parse_assignments(assigns)))
    return [(name, {**(common or {}), **s}) for name, s in out]


def setting_label(row: pd.Series) -> str:
    """What a line of the privacy-utility plot stands for: the mode, its layer range, the LoRA rank."""
    mode = str(row.get("mode") or "attention")
    label = f"{mode} {row.get('layers')}" if mode in ("attention", "lora") else mode
    rank = pd.to_numeric(row.get("lora_rank"), errors="coerce")
    if mode == "lora" and pd.notna(rank):
        label += f" r{int(rank)}"  # exp show may give the rank as a float
    return label


def exp_run_args(name: str, setting: dict, *, added: frozenset | set = frozenset()) -> list[str]:
    """``exp run -n NAME -S key=value ...`` (values as YAML flow scalars and lists). Keys in ``added`` go as
    ``-S ++key=value`` (Hydra's "set or add"): keys the workspace's params.yaml lacks, which ``rescore_sweep`` adds when it
    re-scores an older experiment with a key this commit's code has (``keys_to_add``). Every other key must exist, so
    that DVC refuses a misspelt one."""
    args = ["exp", "run", "-n", name]
    for key, value in setting.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()
        args += ["-S", f"{'++' if key in added else ''}{key}={text}"]
    return args


def keys_to_add(experiment: dict, head: dict, overrides: dict) -> set[str]:
    """The keys of ``overrides`` that an applied experiment's params (``experiment``) lack but the workspace's own
    params.yaml (``head``) has: a key added since the experiment ran, which re-scoring adds (``exp_run_args``'s
    ``added``). A key that neither has is refused by name, as DVC refuses a misspelt one."""
    absent = missing_keys(experiment, overrides)
    unknown = missing_keys(head, absent)
    if unknown:
        raise SystemExit(f"cannot re-score with {', '.join(sorted(unknown))}: no such key in params.yaml")
    return absent


def missing_keys(params: dict, keys) -> set[str]:
    """The dotted ``keys`` that the nested mapping ``params`` does not hold."""
    out = set()
    for key in keys:
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                out.add(key)
                break
            node = node[part]
    return out


def kept(name: str, existing: set[str], *, rerun: bool, repo: str, who: str) -> bool:
    """True when experiment ``name`` exists and is kept (an interrupted sweep resumes); with ``rerun`` an
    existing one is removed first (not `exp run --force`: that re-runs every stage) and False returned."""
    if name in existing:
        if not rerun:
            print(f"{who}: experiment {name} exists, kept (--rerun to replace it)")
            return True
        dvc("exp", "remove", name, repo=repo)
    return False


def run_sweep(settings: list[tuple[str, dict]], *, repo: str = ".", rerun: bool = False, audit: bool = False) -> None:
    """Runs each setting as a named experiment (the stages up to the scores; the privacy audit too with
    ``audit``); one that already exists is kept (an interrupted sweep resumes) unless ``rerun``."""
    dvc("repro", *UPSTREAM, repo=repo)
    params_file = Path(repo) / "params.yaml"
    original = params_file.read_text()
    try:
        existing = set(comparison(repo=repo)["experiment"]) if (Path(repo) / "dvc.lock").exists() else set()
        for name, s in settings:
            if kept(name, existing, rerun=rerun, repo=repo, who="sweep"):
                continue
            # `dvc exp run` leaves the previous experiment's params in the workspace: start each one from
            # the sweep's own baseline, or a setting would silently inherit the one before it
            params_file.write_text(original)
            if audit:  # the audit is opt-in (audit.enabled): on in this experiment, its stage a target
                dvc(*exp_run_args(name, {**s, "audit.enabled": True}), *TARGETS, "audit", repo=repo)
            else:
                dvc(*exp_run_args(name, s), *TARGETS, repo=repo)
    finally:
        params_file.write_text(original)  # the workspace's own params stay as they were


def ancestors(stages: dict, stage: str) -> set[str]:
    """``stage`` and every stage it depends on, transitively, through dvc.yaml's deps and outs."""
    needs = stage_needs(stages)
    seen: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += needs[name]
    return seen


def upstream_params(stages: dict, stage: str = "dp_finetune") -> set[str]:
    """The params keys that ``stage`` and every stage before it read: a change to any of them re-runs ``stage``."""
    keys: set[str] = set()
    for name in ancestors(stages, stage):
        for entry in stages[name].get("params", []):
            keys.update([entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks])
    return keys


def rescore_starts(stages: dict, model: str) -> list[str]:
    """The stages that read the DP release ``model`` on the way to the scores (sample, not the audit)."""
    before_scores = set().union(*(ancestors(stages, t) for t in TARGETS))
    return [name for name, st in stages.items() if model in st.get("deps", []) and name in before_scores]


def check_rescore_keys(overrides: dict, stages: dict) -> None:
    """Re-scoring keeps the DP release as it is: refuses any key that dp_finetune or its upstream reads."""
    keys = upstream_params(stages)
    bad = sorted(k for k in overrides if any(k == p or k.startswith(p + ".") or p.startswith(k + ".") for p in keys))
    if bad:
        raise SystemExit(f"cannot re-score with {', '.join(bad)}: dp_finetune (or a stage before it) reads it, so the "
                         f"DP model would be trained again (a new release that spends budget). Re-score only with "
                         f"keys of the later stages (sample, fid, classifier, their seeds), or run the sweep anew.")


def _release_hash(repo: str, path: str) -> str | None:
    lock = yaml.safe_load((Path(repo) / "dvc.lock").read_text())["stages"].get("dp_finetune", {})
    return next((o.get("md5") for o in lock.get("outs", []) if o["path"] == path), None)


RESCORE_CODE = ("experiment", "head")
KEPT_ON_RESTORE = ("params.yaml", "dvc.lock")


def restore_head_code(repo: str = ".", *, keep: tuple[str, ...] = KEPT_ON_RESTORE) -> list[str]:
    """Every git-tracked file that differs from HEAD back to HEAD's version, except ``keep`` (the applied experiment's
    params and lock): after ``dvc exp apply``, the current code with the experiment's settings. Returns the files."""
    out = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=repo, text=True, capture_output=True, check=True)
    files = [f for f in out.stdout.splitlines() if f and f not in keep]
    if files:
        subprocess.run(["git", "checkout", "HEAD", "--", *files], cwd=repo, check=True)
    return files


def rescore_sweep(pairs: list[tuple[str, str, dict]], *, repo: str = ".", rerun: bool = False,
                  code: str = "experiment") -> None:
    """For each ``(base, name, overrides)``: applies the existing experiment ``base`` to the workspace
    (``dvc exp apply``) and runs it again as ``name`` with ``overrides`` (keys of the stages after
    dp_finetune only, checked). Only the stages from the release's readers on run (``--downstream
    sample``), never dp_finetune: the same DP release is sampled and scored anew (post-processing, no
    new budget; its ledger is the base's). After each run the release's hash in dvc.lock is compared
    with the base's: a re-trained model stops the sweep.

    ``code``: "experiment" runs the later stages with the code the experiment was run with (what ``exp apply``
    brings back); "head" with this commit's code (``restore_head_code``), e.g. a sampler added since. At the end the
    workspace's params.yaml is restored, and with "head" its code too."""
    if code not in RESCORE_CODE:
        raise ValueError(f"code {code!r}; expected one of {RESCORE_CODE}")
    stages = read_stages(repo)
    model = stage_paths(stages, "dp_finetune")["model"]
    starts = rescore_starts(stages, model)
    for _, _, overrides in pairs:
        check_rescore_keys(overrides, stages)
    params_file = Path(repo) / "params.yaml"
    original = params_file.read_text()
    head_params = yaml.safe_load(original) or {}  # the workspace's own keys: what re-scoring may add
    try:
        existing = set(comparison(repo=repo, num_commits=100)["experiment"])
        for base, name, overrides in pairs:
            if base not in existing:
                raise SystemExit(f"experiment {base} not found in this workspace (dvc exp show): nothing to re-score")
            if kept(name, existing, rerun=rerun, repo=repo, who="rescore"):
                continue
            dvc("exp", "apply", base, repo=repo)
            if code == "head":
                restored = restore_head_code(repo)
                print(f"rescore: {name} with this commit's code ({len(restored)} files restored after exp apply)")
            before = _release_hash(repo, model)
            absent = keys_to_add(yaml.safe_load(params_file.read_text()) or {}, head_params, overrides)
            # --downstream: from the stages after the release only. dp_finetune itself looks changed after
            # `exp apply` (its private dvclive folder is never in git), and must not run again
            dvc(*exp_run_args(name, overrides, added=absent), "--downstream", *starts, repo=repo)
            if _release_hash(repo, model) != before:
                raise RuntimeError(f"re-scoring {base} as {name} trained {model} again: not a re-score")
    finally:
        params_file.write_text(original)
        if code == "head":
            restore_head_code(repo)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def comparison(names: list[str] | None = None, *, repo: str = ".", num_commits: int = 1) -> pd.DataFrame:
    """One row per experiment, from dvc.api.exp_show (what ``dvc exp show`` prints); experiments
    branched from the last ``num_commits`` commits count."""
    import dvc.api

    stages = read_stages(repo)
    ledger = stage_paths(stages, "dp_finetune")["ledger"]
    # the public models an experiment branches from (their hashes as deps of later stages): a table's rows share them
    public = {"public_ae": stage_paths(stages, "pretrain_ae")["model"], "public_ldm": stage_paths(stages, "pretrain_ldm")["model"]}
    rows, baseline_seen = [], False
    for rec in dvc.api.exp_show(repo=repo, num=num_commits):
        exp = rec.get("Experiment") or rec.get("rev")
        if rec.get("typ") == "baseline":
            if baseline_seen or rec.get("rev") == "workspace":  # the workspace row may hold a half-applied experiment
                continue
            baseline_seen = True
            exp = f"baseline@{rec.get('rev')}"  # the committed run the experiments branch from (HEAD)
        elif names is not None and exp not in names:
            continue
        row = {"experiment": exp}
        for col, key in COLUMNS.items():
            key = key.replace("ledger:", ledger + ":") if key.startswith("ledger:") else key
            # exp_show names a metric "file:key" only where the key repeats across metrics files
            row[col] = rec.get(key, rec.get(key.split(":")[-1]))
        row.update({col: rec.get(path) for col, path in public.items()})
        for col in ("private", "dp_release"):  # exp_show may give booleans as strings
            row[col] = {"true": True, "false": False}.get(str(row[col]).lower(), row[col])
        rows.append(row)
    df = pd.DataFrame(rows)
    if names is not None and not df.empty:
        df["order"] = df["experiment"].map({n: i for i, n in enumerate(names)}).fillna(-1)
        df = df.sort_values("order").drop(columns="order").drop_duplicates("experiment", keep="first")
    return df.reset_index(drop=True)


def plot(df: pd.DataFrame, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df.copy()
    for col in ("epsilon_target", "cnn_accuracy", "cnn_accuracy_std", "fid_domain"):
        df[col] = pd.to_numeric(df.get(col), errors="coerce")  # dvc exp show writes "!" for what has no value
    df = df[df["cnn_accuracy"].notna()]  # e.g. a baseline that was never run through to the scores
    private = df["private"].astype(str).str.lower()
    dp = df[(private == "true") & (df["mode"].astype(str) != "none")].copy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    dp["setting"] = dp.apply(setting_label, axis=1) if not dp.empty else []
    for label, part in dp.groupby("setting", sort=False):
        part = part.sort_values("epsilon_target")
        axes[0].errorbar(part["epsilon_target"], 100 * part["cnn_accuracy"], yerr=100 * part["cnn_accuracy_std"].fillna(0),
                         fmt="o-", capsize=3, label=label)
        axes[1].plot(part["epsilon_target"], part["fid_domain"], "o-", label=label)
    for rows, style, color, label in (((private == "false") & (df["mode"].astype(str) != "none"), "--", "gray", "non-private"),
                                      (df["mode"].astype(str) == "none", ":", "red", "public only")):
        for _, r in df[rows].iterrows():
            axes[0].axhline(100 * r["cnn_accuracy"], ls=style, c=color, label=label)
            axes[1].axhline(r["fid_domain"], ls=style, c=color, label=label)
    axes[0].set(xscale="log", xlabel="epsilon (target)", ylabel="CNN accuracy on real test (%)", title="utility")
    axes[1].set(xscale="log", xlabel="epsilon (target)", ylabel="FID (domain extractor)", title="fidelity")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(df: pd.DataFrame, out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(df.to_markdown(index=False, floatfmt=".4g") + "\n")
    plot(df, out / "privacy_utility.png")
    return {"csv": str(out / "comparison.csv"), "md": str(out / "comparison.md"), "png": str(out / "privacy_utility.png")}


def sweep_flow_fn(epsilons: list[float], layers: list[str] | None = None, extra: list[str] | None = None, repo: str = ".",
                  out_dir: str = "reports/sweep", common: dict | None = None) -> dict:
    from prefect.artifacts import create_table_artifact

    settings = settings_of(epsilons, layers or [], extra or [], common)
    run_sweep(settings, repo=repo)
    df = comparison([n for n, _ in settings], repo=repo)
    files = write_outputs(df, Path(repo) / out_dir)
    create_table_artifact(key="dpldm-sweep", table=df.astype(str).to_dict("records"), description="dvc exp comparison")
    return files


def sweep_flow(*args, **kwargs):
    from prefect import flow

    return flow(name="dpldm-sweep", log_prints=True)(sweep_flow_fn)(*args, **kwargs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 5.0, 10.0])
    ap.add_argument("--layers", nargs="*", default=[], help="layer ranges like 1-7 4-7")
    ap.add_argument("--extra", nargs="*", default=[], help="more experiments: name:key=value,key=value")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every experiment of the sweep, like finetune.epochs=5")
    ap.add_argument("--out", default="reports/sweep")
    ap.add_argument("--prefect", action="store_true", help="run as a Prefect flow (table artifact)")
    ap.add_argument("--pool", metavar="DEPLOYMENT", help="one flow run per setting on a work pool's workers, through "
                    "this deployment of pipeline/pool.py (e.g. dpldm-setting/dpldm-gpu); see python -m pipeline.pool -h")
    ap.add_argument("--remote", default="origin", help="with --pool: the git remote the workers clone and push to")
    ap.add_argument("--retries", type=int, default=1, help="with --pool: resubmit a setting whose run crashed (its "
                    "worker died) up to this many times; its ledger counts every lost run")
    ap.add_argument("--compare-only", action="store_true", help="skip running; rebuild the comparison")
    ap.add_argument("--num-commits", type=int, default=1, help="also list experiments branched from older commits")
    ap.add_argument("--rerun", action="store_true", help="replace experiments of the same name instead of keeping them")
    ap.add_argument("--with-audit", action="store_true", help="also run the privacy audit stage in every experiment")
    args = ap.parse_args(argv)
    common = parse_assignments(",".join(args.set)) if args.set else None
    settings = settings_of(args.epsilons, args.layers, args.extra, common)
    if args.prefect:
        print(sweep_flow(args.epsilons, args.layers, args.extra, out_dir=args.out, common=common))
        return
    if args.pool and not args.compare_only:
        from pipeline.pool import pool_sweep

        runs = pool_sweep(settings, args.pool, remote=args.remote, retries=args.retries)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(runs).to_csv(Path(args.out) / "pool_runs.csv", index=False)
        print(pd.DataFrame(runs).to_markdown(index=False))
    elif not args.compare_only:
        run_sweep(settings, rerun=args.rerun, audit=args.with_audit)
    df = comparison([n for n, _ in settings], num_commits=args.num_commits)
    print(df.to_markdown(index=False, floatfmt=".4g"))
    print(write_outputs(df, args.out))


if __name__ == "__main__":
    main()
