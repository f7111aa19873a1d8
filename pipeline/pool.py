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
"""
from __future__ import annotations

import argparse
import re
import socket
import subprocess
import time
from pathlib import Path

import yaml

from pipeline.boundary import read_stages, stages_on_side

# the stages every output of which is public (dvc.yaml meta.side): what workers pull instead of recomputing
PUBLIC_UPSTREAM = tuple(stages_on_side(read_stages(Path(__file__).resolve().parents[1]), "public"))
FLOW_NAME = "dpldm-setting"


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


def setting_flow_fn(name: str, setting: dict, lock: str, remote: str = "origin", repo: str = ".") -> dict:
    """One setting, on a worker, in the clone its deployment's pull step made (the working directory)."""
    from prefect.artifacts import create_table_artifact

    from pipeline.flow import artifact_key
    from pipeline.sweep import TARGETS, exp_run_args

    lock_file = Path(repo) / "dvc.lock"
    if lock_file.exists():
        raise RuntimeError(f"{lock_file.resolve()} exists: a setting runs in a fresh clone of the git remote")
    lock_file.write_text(lock)
    _dvc("pull", *PUBLIC_UPSTREAM, repo=repo)
    out = _dvc(*exp_run_args(name, setting), *TARGETS, repo=repo)
    _dvc("exp", "push", remote, name, repo=repo)
    record = {"experiment": name, "host": socket.gethostname(), "workspace": str(Path(repo).resolve()),
              "stages_run": ", ".join(ran_stages(out))}
    create_table_artifact(key=artifact_key(f"dpldm-setting-{name}"), table=[record],
                          description=f"where setting {name} ran and which stages it ran")
    return record


def _flow():
    from prefect import flow

    return flow(name=FLOW_NAME, log_prints=True)(setting_flow_fn)


dpldm_setting = _flow()  # the deployment's entrypoint: pipeline/pool.py:dpldm_setting


def deploy(pool: str, source: str, branch: str | None = None, name: str | None = None) -> str:
    """Create (or update) the ``dpldm-setting`` deployment on ``pool``: its pull step clones ``source``."""
    from prefect.runner.storage import GitRepository

    storage = GitRepository(url=source, branch=branch) if branch else GitRepository(url=source)
    flow = dpldm_setting.from_source(source=storage, entrypoint="pipeline/pool.py:dpldm_setting")
    dep_id = flow.deploy(name=name or pool, work_pool_name=pool, print_next_steps=False)
    return f"{FLOW_NAME}/{name or pool} ({dep_id})"


def _check_pushed(repo: str, remote: str) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    refs = subprocess.run(["git", "ls-remote", remote], cwd=repo, capture_output=True, text=True, check=True).stdout
    if head not in refs:
        raise RuntimeError(f"HEAD {head[:10]} is not on the git remote {remote!r}: the workers clone the remote, so "
                           f"push the commit first (git push {remote} HEAD)")


def pool_sweep(settings: list[tuple[str, dict]], deployment: str, *, repo: str = ".", remote: str = "origin",
               poll_s: float = 5.0, timeout_s: float | None = None) -> list[dict]:
    """Submit one flow run of ``deployment`` per setting, wait for all, pull the experiments back.
    Returns one record per setting (flow run id, state, where it ran)."""
    from prefect import get_client
    from prefect.artifacts import Artifact
    from prefect.deployments import run_deployment

    from pipeline.flow import artifact_key

    _check_pushed(repo, remote)
    _dvc("repro", *PUBLIC_UPSTREAM, repo=repo)  # the upstream, once, here
    _dvc("push", *PUBLIC_UPSTREAM, repo=repo)
    lock = public_lock(repo)
    runs = {name: run_deployment(deployment, parameters={"name": name, "setting": s, "lock": lock, "remote": remote},
                                 flow_run_name=name, timeout=0, as_subflow=False) for name, s in settings}
    print(f"pool: submitted {len(runs)} flow runs of {deployment}: {', '.join(runs)}")
    start, states = time.time(), {}
    with get_client(sync_client=True) as client:
        while len(states) < len(runs):
            for name, fr in runs.items():
                if name not in states:
                    state = client.read_flow_run(fr.id).state
                    if state is not None and state.is_final():
                        states[name] = state
                        print(f"pool: {name}: {state.type.value}")
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
        records.append({"experiment": name, "flow_run": str(fr.id), "state": states[name].type.value, **row})
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("deploy", help="create the dpldm-setting deployment on a work pool")
    d.add_argument("--pool", required=True)
    d.add_argument("--source", required=True, help="the git remote the workers clone (URL or path)")
    d.add_argument("--branch")
    d.add_argument("--name", help="deployment name (default: the pool's)")
    args = ap.parse_args(argv)
    print(deploy(args.pool, args.source, args.branch, args.name))


if __name__ == "__main__":
    main()
