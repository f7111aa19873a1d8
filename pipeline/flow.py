"""The Prefect flow: one task per DVC stage, read from dvc.yaml, run through DVC in its order.

DVC owns the DAG and caching (each task is ``dvc repro --single-item STAGE``); Prefect's own task
caching is off. A task ends ``Completed`` when its stage ran and ``UpToDate`` when DVC skipped it.
Retries happen only for infrastructure failures (the stage process killed by a signal); a DP
fine-tuning retry resumes from its checkpoint or counts as a new attempt in the ledger.

    python -m pipeline.flow [--repo .] [--set finetune.epsilon=5 ...]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from dpldm.config import with_overrides
from dpldm.ledger import Ledger
from pipeline.boundary import check_boundary, private_only_stages, read_stages, stage_needs, stage_paths

# DVC's own lines about a stage: the only lines of a private-only stage's output that reach Prefect's logs
DVC_CONTROL = ("Running stage", "Stage '", "Updating lock file", "Use `dvc push`", "To track the changes", "ERROR:", "error:")


def dvc_bin() -> str:
    return str(Path(sys.executable).parent / "dvc")


def stage_env() -> dict:
    """The stage commands' ``python`` is this interpreter (the project's venv), activated or not."""
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, "DPLDM_PROGRESS": "0", "DVC_NO_ANALYTICS": "1"}


def stage_order(repo: str | os.PathLike = ".") -> list[str]:
    """Stages of dvc.yaml in a topological order of their deps/outs (ties kept in file order)."""
    stages = read_stages(repo)
    needs = stage_needs(stages)
    order, done = [], set()
    while len(order) < len(stages):
        ready = [n for n in stages if n not in done and needs[n] <= done]
        if not ready:
            raise ValueError(f"dvc.yaml has a cycle among {sorted(set(stages) - done)}")
        order.append(ready[0])
        done.add(ready[0])
    return order


def _infrastructure_failure(task, task_run, state) -> bool:
    """Retry only when the stage process was killed (signal: OOM killer, preemption), never because
    of what the stage computed."""
    try:
        state.result()
    except StageFailed as err:
        return err.returncode < 0
    except Exception:
        return False
    return False


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        super().__init__(f"stage {stage} failed with exit code {returncode}:\n{tail}")
        self.returncode = returncode


def log_line(line: str, *, private_stage: bool) -> str | None:
    """What of a stage's output line goes to Prefect's log: all of it, or for a stage whose outputs are
    all private (dvc.yaml meta.side), only DVC's control lines and errors."""
    if not private_stage or line.lstrip().startswith(DVC_CONTROL):
        return line
    return None


@task(name="dvc-stage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5, retry_condition_fn=_infrastructure_failure,
      task_run_name="{stage}")
def run_stage(stage: str, repo: str, private_stage: bool = False) -> Completed:
    """``dvc repro --single-item STAGE``, its output streamed into the run log (withheld for stages whose
    outputs are all private)."""
    logger = get_run_logger()
    t0 = time.time()
    proc = subprocess.Popen([dvc_bin(), "repro", "--single-item", stage], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=stage_env())
    lines, withheld = [], 0
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        shown = log_line(line, private_stage=private_stage)
        if shown is None:
            withheld += 1
        else:
            logger.info(shown)
    proc.wait()
    if withheld:
        logger.info(f"{withheld} output lines of private stage {stage} withheld (private side; see the terminal of a local run)")
    if proc.returncode:
        tail = [ln for ln in lines[-30:] if log_line(ln, private_stage=private_stage) is not None]
        raise StageFailed(stage, proc.returncode, "\n".join(tail))
    ran = any(f"Running stage '{stage}'" in ln for ln in lines)
    result = {"stage": stage, "ran": ran, "seconds": round(time.time() - t0, 1)}
    return Completed(data=result, name="Completed" if ran else "UpToDate",
                     message=f"ran in {result['seconds']} s" if ran else "up to date (DVC skipped it)")


@contextlib.contextmanager
def overridden_params(repo: str, overrides: dict | None):
    """params.yaml with ``overrides`` applied for the duration of one flow run, then restored byte for
    byte (comments included), even when a stage fails: the next run starts from the committed params,
    never from the previous run's overrides."""
    path = Path(repo) / "params.yaml"
    original = path.read_bytes()
    try:
        apply_overrides(repo, overrides)
        yield
    finally:
        if path.read_bytes() != original:
            path.write_bytes(original)


def apply_overrides(repo: str, overrides: dict | None) -> None:
    """Write ``{"finetune.epsilon": 5}``-style overrides into params.yaml (as ``dvc exp run -S`` does)."""
    if not overrides:
        return
    path = Path(repo) / "params.yaml"
    params = with_overrides(yaml.safe_load(path.read_text()), overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    import re

    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def read_metrics(repo: str) -> dict:
    """The privacy ledger and the scores of the last run, from the stage outputs."""
    root = Path(repo)
    out = {}
    ledger = root / stage_paths(read_stages(root), "dp_finetune")["ledger"]
    if ledger.exists():
        out["ledger"] = Ledger.from_dict(json.loads(ledger.read_text()))
    for stage in ("score_fid", "score_classifier", "reference", "audit"):
        f = root / "dvclive" / stage / "metrics.json"
        if f.exists():
            out[stage] = json.loads(f.read_text())
    return out


def _pct(mean, std=None) -> str:
    return "-" if mean is None else f"{100 * mean:.1f}%" + ("" if std is None else f" (std {100 * std:.1f})")


ARTIFACT_PNG_BYTES = 24_000  # prefect 3.8.8's UI showed a blank artifact page for the full sample grid (95 KB PNG,
                             # 128 KB of markdown) and rendered a 22 KB grid fine (checked in headless chromium)


def fit_png(png: bytes, max_bytes: int = ARTIFACT_PNG_BYTES) -> bytes:
    """``png`` as a grayscale PNG of at most ``max_bytes``: halved (nearest neighbour, so pixels stay
    sharp and compress well) until it fits."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("L")
    while True:
        buf = io.BytesIO()
        im.save(buf, "PNG", optimize=True)
        if buf.tell() <= max_bytes or min(im.size) < 64:
            return buf.getvalue()
        im = im.resize((im.size[0] // 2, im.size[1] // 2), Image.NEAREST)


def scores_markdown(scores: dict, reference: dict, led: Ledger | None, grid_png: bytes | None) -> str:
    """The ``dpldm-scores`` artifact: the privacy stamp, rounded figures with their std beside the
    real-data reference, and the sample grid inline (a data URI: any machine's browser shows it).
    The grid is embedded only for a DP release or the public model: samples of a model fine-tuned
    without DP are private."""
    import base64

    stamp = led.release if led else scores.get("release", "release unknown")
    dp = bool(led and led.dp_release)
    spent = led.epsilon_spent if led else None
    md = [f"**{stamp}**" + ("" if dp else " -- NOT A DP RELEASE"),
          f"private: {led.private}, epsilon spent: {'-' if spent is None else f'{spent:.4g}'} (delta {led.delta:g}), "
          f"all attempts on this data: {'-' if led.epsilon_spent_all_attempts is None else f'{led.epsilon_spent_all_attempts:.4g}'}"
          if led else "no ledger", "",
          "| metric | synthetic data | real data (same classifier, real train split) |", "|---|---|---|"]
    for name in ("cnn", "mlp", "logreg"):
        if f"{name}_accuracy" in scores:
            md.append(f"| {name.upper() if name != 'logreg' else 'logistic regression'} accuracy on the real test split | "
                      f"{_pct(scores[f'{name}_accuracy'], scores.get(f'{name}_accuracy_std'))} | "
                      f"{_pct(reference.get(f'real_{name}_accuracy'), reference.get(f'real_{name}_accuracy_std'))} |")
    for key, value in scores.items():
        if key.startswith(("fid_", "kid_")) and key.endswith(("_mean", "domain", "inception")) and isinstance(value, float):
            std = scores.get(key.replace("_mean", "_std")) if key.endswith("_mean") else None
            md.append(f"| {key} (lower is better) | {value:.1f}" + (f" (std {std:.1f})" if std is not None else "") + " | - |")
    if grid_png is not None and (dp or (led is not None and led.mode == "none")):
        md += ["", "One row per class:", "", f"![samples](data:image/png;base64,{base64.b64encode(grid_png).decode()})"]
    elif grid_png is not None:
        md += ["", "Sample grid withheld: the model is not a DP release, so its samples are private."]
    return "\n".join(md)


def publish_artifacts(repo: str, results: list[dict]) -> dict:
    m = read_metrics(repo)
    keys = {}
    create_table_artifact(key=artifact_key("dpldm-stages"), table=results, description="DVC stages: ran or up to date")
    keys["stages"] = "dpldm-stages"
    led: Ledger | None = m.get("ledger")
    if led is not None:
        create_table_artifact(key="dpldm-privacy-ledger", table=led.summary(),
                              description=f"Privacy ledger of dp_finetune: {led.release}")
        keys["ledger"] = "dpldm-privacy-ledger"
    scores = {**m.get("score_fid", {}), **m.get("score_classifier", {})}
    if scores:
        grid = Path(repo) / stage_paths(read_stages(repo), "sample")["grid"]
        md = scores_markdown(scores, m.get("reference", {}), led, fit_png(grid.read_bytes()) if grid.exists() else None)
        create_markdown_artifact(key="dpldm-scores", markdown=md, description="FID/KID and downstream accuracy")
        keys["scores"] = "dpldm-scores"
    audit = m.get("audit")
    if audit:
        md = [f"**{audit.get('audit')}**", ""]
        if "whitebox_epsilon_lower_bound" in audit:
            md += [f"White-box gradient canaries: epsilon lower bound **{audit['whitebox_epsilon_lower_bound']:.3g}** at "
                   f"{audit['whitebox_confidence']:.0%} confidence against the audit run's claimed "
                   f"**{audit['audit_epsilon_claimed']:.3g}** ({audit['audit_steps']} steps, sigma "
                   f"{audit['audit_noise_multiplier']:.3g}, K = {audit['audit_K']}); m = {audit['whitebox_canaries']} canaries, "
                   f"{audit['whitebox_guesses']} guesses, {audit['whitebox_correct']} correct, "
                   f"{audit['whitebox_abstentions']} abstentions.",
                   f"Black-box membership (released model, class-balanced private train vs test): AUC "
                   f"{audit['membership_auc']:.3f}, TPR at 1% FPR {audit['membership_tpr_at_0.01_fpr']:.3f}; the public "
                   f"model (never trained on either) as control: AUC {audit['membership_auc_public_model']:.3f}.", "",
                   "A lower bound, not a certificate: it detects bugs (noise missing, clipping skipped, K copies "
                   "clipped separately); it cannot prove privacy."]
        create_markdown_artifact(key="dpldm-audit", markdown="\n".join(md), description="Empirical privacy audit")
        keys["audit"] = "dpldm-audit"
    return keys


@flow(name="dpldm-pipeline", log_prints=True)
def dpldm_pipeline(repo: str = ".", overrides: dict | None = None, pull: bool = False, push: bool = False) -> list[dict]:
    """Run every DVC stage as its own task, in DVC's order; publish the ledger and scores.
    ``pull``/``push``: fetch/share artifacts through the DVC remote (GPU workers)."""
    repo = str(Path(repo).resolve())
    stages = read_stages(repo)
    errors = check_boundary(stages)
    if errors:
        raise ValueError("dvc.yaml breaks the declared privacy boundary:\n" + "\n".join(errors))
    private_only = private_only_stages(stages)
    if pull:
        subprocess.run([dvc_bin(), "pull", "--allow-missing"], cwd=repo, env=stage_env(), check=False)
    results = []
    with overridden_params(repo, overrides):
        for stage in stage_order(repo):
            state = run_stage(stage, repo, private_stage=stage in private_only, return_state=True)
            results.append(state.result())
        publish_artifacts(repo, results)
    if push:
        subprocess.run([dvc_bin(), "push"], cwd=repo, env=stage_env(), check=True)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override, e.g. finetune.epsilon=5")
    args = ap.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    for r in dpldm_pipeline(repo=args.repo, overrides=overrides):
        print(f"{r['stage']:>18}: {'ran' if r['ran'] else 'up to date'} ({r['seconds']} s)")


if __name__ == "__main__":
    main()
