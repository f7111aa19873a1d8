"""A sweep spread over Prefect workers: one flow run per setting, each in its own clone.

    python -m pipeline.pool deploy --pool dpldm-gpu --source <git url> [--branch main]   # once
    prefect worker start --pool dpldm-gpu --type process                                  # on each machine
    python -m pipeline.sweep --pool dpldm-setting/dpldm-gpu --epsilons 1 5 10              # submit, wait, compare

The submitting machine reproduces the public upstream stages once and pushes them to the DVC remote.
Each setting is a run of the ``dpldm-setting`` deployment: the deployment's pull step clones the git
remote into a fresh folder on whichever worker takes it; the run writes the public stages' lock
entries, pulls their outputs (so it retrains none of them), recomputes the private stages from the
worker's own copy of the private data (their outputs are ``push: false``: never on the shared remote),
runs ``dvc exp run -n NAME -S ...``, and pushes the experiment (git refs to the git remote, outputs to
the DVC remote). The submitter pulls the experiments back and builds the comparison as ``pipeline.sweep``
does. A run starts from the committed params plus its own ``-S`` overrides, in a fresh clone: nothing of
another setting can leak into it.

Faults: a worker that dies takes its flow run, clone and checkpoint with it. The deployment's runs emit
heartbeats, and ``deploy`` creates an automation that marks a run of this deployment Crashed once its
heartbeats stop. The submitter resubmits a crashed setting (``retries``), and the new run records the lost
run in its ledger as an attempt at its target epsilon (it may have trained on the private data before
it died): ``epsilon_spent_all_attempts`` then adds it, and ``attempt`` counts it. A Failed run (an error
in the setting itself) is not resubmitted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import yaml

from pipeline.boundary import read_stages, stage_paths, stages_on_side

# the stages every output of which is public (dvc.yaml meta.side): what workers pull instead of recomputing
PUBLIC_UPSTREAM = tuple(stages_on_side(read_stages(Path(__file__).resolve().parents[1]), "public"))
FLOW_NAME = "dpldm-setting"
HEARTBEAT_S = 30  # the deployment's flow runs emit a heartbeat this often (Prefect's minimum)
ZOMBIE_AFTER_S = 90  # ... and are marked Crashed when none came for this long (three missed heartbeats)


def _dvc(*args: str, repo: str) -> str:
    from pipeline.sweep import dvc

    return dvc(*args, repo=repo).stdout


def public_lock(repo: str = ".") -> str:
    """The ``dvc.lock`` entries of the public upstream stages, as YAML: what a worker needs to pull their
    outputs. The private stages' entries (hashes of private outputs) stay on this machine."""
    lock = yaml.safe_load((Path(repo) / "dvc.lock").read_text())
    missing = [s for s in PUBLIC_UPSTREAM if s not in lock.get("stages", {})]
    if missing:
        raise RuntimeError(f"dvc.lock has no entry for {missing}: run `dvc repro {' '.join(PUBLIC_UPSTREAM)}` first")
    return yaml.safe_dump({"schema": lock["schema"], "stages": {s: lock["stages"][s] for s in PUBLIC_UPSTREAM}}, sort_keys=False)


def ran_stages(dvc_output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", dvc_output)


def record_lost_attempts(repo: str, setting: dict, lost: list[dict]) -> list[dict]:
    """Write the lost runs of this setting into the fresh clone's attempt records (dp_finetune's state
    folder), before its own attempt: its ledger then counts them (``dpldm.ledger.lost_attempt``)."""
    from dpldm.config import load_section, with_overrides
    from dpldm.ledger import ATTEMPTS, lost_attempt

    state = Path(repo) / stage_paths(read_stages(repo), "dp_finetune")["checkpoint"]
    if (state / ATTEMPTS).exists():
        raise RuntimeError(f"{state / ATTEMPTS} exists: a setting runs in a fresh clone of the git remote")
    params = yaml.safe_load((Path(repo) / "params.yaml").read_text())
    cfg = load_section(with_overrides(params, setting), "finetune")
    records = [lost_attempt(cfg, where=f"flow run {r['flow_run']} on {r.get('worker') or 'an unknown worker'}, "
                                       f"{r['state'].lower()}") for r in lost]
    state.mkdir(parents=True, exist_ok=True)
    (state / ATTEMPTS).write_text(json.dumps(records, indent=1))
    return records


def setting_flow_fn(name: str, setting: dict, lock: str, remote: str = "origin", repo: str = ".",
                    lost: list[dict] | None = None) -> dict:
    """One setting, on a worker, in the clone its deployment's pull step made (the working directory).
    ``lost``: earlier runs of this setting that crashed (flow_run, state, worker), counted in the ledger."""
    from prefect.artifacts import create_table_artifact

    from pipeline.flow import artifact_key
    from pipeline.sweep import TARGETS, exp_run_args

    lock_file = Path(repo) / "dvc.lock"
    if lock_file.exists():
        raise RuntimeError(f"{lock_file.resolve()} exists: a setting runs in a fresh clone of the git remote")
    lock_file.write_text(lock)
    if lost:
        record_lost_attempts(repo, setting, lost)
        print(f"pool: {name}: {len(lost)} earlier run(s) of this setting were lost; the ledger counts each as an "
              "attempt at its target epsilon")
    _dvc("pull", *PUBLIC_UPSTREAM, repo=repo)
    out = _dvc(*exp_run_args(name, setting), *TARGETS, repo=repo)
    _dvc("exp", "push", remote, name, repo=repo)
    # the worker: a process worker runs each flow run as its child
    record = {"experiment": name, "host": socket.gethostname(), "worker": f"{socket.gethostname()}:{os.getppid()}",
              "workspace": str(Path(repo).resolve()), "stages_run": ", ".join(ran_stages(out)),
              "lost_runs": len(lost or [])}
    create_table_artifact(key=artifact_key(f"dpldm-setting-{name}"), table=[record],
                          description=f"where setting {name} ran and which stages it ran")
    return record


def _flow():
    from prefect import flow

    return flow(name=FLOW_NAME, log_prints=True)(setting_flow_fn)


dpldm_setting = _flow()  # the deployment's entrypoint: pipeline/pool.py:dpldm_setting


def deploy(pool: str, source: str, branch: str | None = None, name: str | None = None, *,
           heartbeat_s: int = HEARTBEAT_S, zombie_after_s: int = ZOMBIE_AFTER_S) -> str:
    """Create (or update) the ``dpldm-setting`` deployment on ``pool``: its pull step clones ``source``;
    its runs emit a heartbeat every ``heartbeat_s``, and an automation marks a run of it Crashed after
    ``zombie_after_s`` without one (a worker that died), which the submitter then resubmits."""
    from prefect.runner.storage import GitRepository

    if zombie_after_s <= heartbeat_s:
        raise ValueError(f"zombie_after_s={zombie_after_s} must exceed heartbeat_s={heartbeat_s}, or live runs are marked Crashed")
    storage = GitRepository(url=source, branch=branch) if branch else GitRepository(url=source)
    flow = dpldm_setting.from_source(source=storage, entrypoint="pipeline/pool.py:dpldm_setting")
    dep_id = flow.deploy(name=name or pool, work_pool_name=pool, print_next_steps=False,
                         job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}})
    crash_zombies(str(dep_id), zombie_after_s)
    return f"{FLOW_NAME}/{name or pool} ({dep_id})"


def crash_zombies(deployment_id: str, within_s: int) -> None:
    """The automation of Prefect's "detect zombie flows" recipe, scoped to one deployment: a run of it
    whose heartbeats stop for ``within_s`` is marked Crashed. Replaces an earlier one of the same name."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = f"dpldm-crash-zombies-{deployment_id}"
    try:
        Automation.read(name=name).delete()
    except ValueError:  # none yet
        pass
    Automation(
        name=name,
        description="marks a dpldm-setting run Crashed when its heartbeats stop (its worker died); pipeline.pool resubmits it",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.deployment.{deployment_id}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {within_s} s: its worker died")],
    ).create()


def _check_pushed(repo: str, remote: str) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    refs = subprocess.run(["git", "ls-remote", remote], cwd=repo, capture_output=True, text=True, check=True).stdout
    if head not in refs:
        raise RuntimeError(f"HEAD {head[:10]} is not on the git remote {remote!r}: the workers clone the remote, so "
                           f"push the commit first (git push {remote} HEAD)")


def pool_sweep(settings: list[tuple[str, dict]], deployment: str, *, repo: str = ".", remote: str = "origin",
               poll_s: float = 5.0, timeout_s: float | None = None, retries: int = 1) -> list[dict]:
    """Submit one flow run of ``deployment`` per setting, wait for all, pull the experiments back. A run
    that Crashed (its worker died) is resubmitted up to ``retries`` times, and the new run's ledger counts
    the lost one. Returns one record per setting (flow run id, state, where it ran, runs lost)."""
    from prefect import get_client
    from prefect.artifacts import Artifact
    from prefect.deployments import run_deployment

    from pipeline.flow import artifact_key

    _check_pushed(repo, remote)
    _dvc("repro", *PUBLIC_UPSTREAM, repo=repo)  # the upstream, once, here
    _dvc("push", *PUBLIC_UPSTREAM, repo=repo)
    lock = public_lock(repo)
    todo = dict(settings)

    def submit(name: str, lost: list[dict]):
        return run_deployment(deployment, parameters={"name": name, "setting": todo[name], "lock": lock, "remote": remote,
                                                      "lost": lost},
                              flow_run_name=f"{name}-retry{len(lost)}" if lost else name, timeout=0, as_subflow=False)

    runs = {name: submit(name, []) for name in todo}
    lost: dict[str, list[dict]] = {name: [] for name in todo}
    print(f"pool: submitted {len(runs)} flow runs of {deployment}: {', '.join(runs)}")
    start, states = time.time(), {}
    with get_client(sync_client=True) as client:
        while len(states) < len(runs):
            for name, fr in list(runs.items()):
                if name in states:
                    continue
                run = client.read_flow_run(fr.id)
                if run.state is None or not run.state.is_final():
                    continue
                if run.state.is_crashed() and len(lost[name]) < retries:
                    lost[name].append({"flow_run": str(fr.id), "state": run.state.type.value,
                                       "worker": run.infrastructure_pid, "message": run.state.message})
                    runs[name] = submit(name, lost[name])
                    print(f"pool: {name}: flow run {fr.id} {run.state.type.value} ({run.state.message}); resubmitted as "
                          f"{name}-retry{len(lost[name])}, whose ledger counts the lost run as an attempt at its target epsilon")
                    continue
                states[name] = run.state
                print(f"pool: {name}: {run.state.type.value}")
            if timeout_s is not None and time.time() - start > timeout_s:
                raise TimeoutError(f"flow runs still running after {timeout_s} s: {sorted(set(runs) - set(states))}")
            if len(states) < len(runs):
                time.sleep(poll_s)
    failed = {n: s.type.value for n, s in states.items() if not s.is_completed()}
    if failed:
        raise RuntimeError(f"settings that did not complete: {failed} (see their logs in the Prefect UI)")
    _dvc("exp", "pull", "--no-cache", remote, *runs, repo=repo)
    records = []
    for name, fr in runs.items():
        art = Artifact.get(artifact_key(f"dpldm-setting-{name}"))
        data = art.data if art is not None else None
        row = (yaml.safe_load(data) if isinstance(data, str) else data or [{}])[0]
        records.append({"experiment": name, "flow_run": str(fr.id), "state": states[name].type.value, **row,
                        "lost_flow_runs": " ".join(r["flow_run"] for r in lost[name])})
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deploy", help="create the dpldm-setting deployment on a work pool")
    d.add_argument("--pool", required=True)
    d.add_argument("--source", required=True, help="the git remote the workers clone (URL or path)")
    d.add_argument("--branch")
    d.add_argument("--name", help="deployment name (default: the pool's)")
    d.add_argument("--heartbeat", type=int, default=HEARTBEAT_S, help="seconds between a run's heartbeats (>= 30)")
    d.add_argument("--zombie-after", type=int, default=ZOMBIE_AFTER_S,
                   help="seconds without a heartbeat after which a run is marked Crashed (and resubmitted)")
    args = ap.parse_args(argv)
    print(deploy(args.pool, args.source, args.branch, args.name, heartbeat_s=args.heartbeat, zombie_after_s=args.zombie_after))


if __name__ == "__main__":
    main()
