"""A sweep spread over Prefect workers, end to end on loopback with real parts: `prefect server start` on
127.0.0.1 (with our pins: it starts, and answers the artifact query the flows read with, which
fastapi >= 0.151 broke), a process work pool, two workers each started in its own clone, a bare git
repository and a local folder as the git and DVC remotes, the tiny profile, two epsilons (pipeline/pool.py)."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import env as base_env
from helpers import free_port, run, tiny_repo, wait_healthy

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PUBLIC_UPSTREAM = {"prepare_public", "pretrain_ae", "encode_public", "pretrain_ldm"}


def test_sweep_on_two_workers_shares_the_upstream_and_compares_both(tmp_path):
    src = tiny_repo(tmp_path / "src")
    remote = tmp_path / "dvc-remote"
    run([str(BIN / "dvc"), "remote", "add", "-d", "-f", "shared", str(remote)], src)
    run(["git", "commit", "-qam", "loopback remotes"], src)
    bare = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(src), str(bare)], tmp_path)
    branch = run(["git", "symbolic-ref", "--short", "HEAD"], bare).stdout.strip()
    for d in ("submitter", "worker1", "worker2"):
        run(["git", "clone", "-q", str(bare), str(tmp_path / d)], tmp_path)

    port = free_port()
    env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}  # every process runs its own clone's code
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2", PATH=str(BIN) + os.pathsep + env["PATH"])
    procs = []

    def start(cmd, cwd, log):
        fh = open(tmp_path / log, "w")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))

    def sh(cmd, cwd, timeout=600):
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
        return p.stdout

    try:
        start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp_path, "server.log")
        assert wait_healthy(f"http://127.0.0.1:{port}/api", procs[0]), (tmp_path / "server.log").read_text()[-3000:]
        sh([str(BIN / "prefect"), "work-pool", "create", "loop", "--type", "process"], tmp_path)
        sub = tmp_path / "submitter"
        print(sh([sys.executable, "-m", "pipeline.pool", "deploy", "--pool", "loop", "--source", str(bare), "--branch", branch], sub))
        for w in ("worker1", "worker2"):
            start([str(BIN / "prefect"), "worker", "start", "--pool", "loop", "--type", "process", "--limit", "1"],
                  tmp_path / w, f"{w}.log")
        out = sh([sys.executable, "-m", "pipeline.sweep", "--pool", "dpldm-setting/loop", "--epsilons", "2", "8",
                  "--out", "reports/sweep"], sub, timeout=1500)
        body = json.dumps({"artifacts": {"key": {"any_": ["x"]}}, "flow_runs": None, "task_runs": None, "limit": 1,
                           "offset": None, "sort": "UPDATED_DESC"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/artifacts/filter", data=body,
                                     headers={"content-type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read()) == []
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    print(out[-3000:])
    # the upstream ran once, here; every setting ran on a worker, in a clone of its own, and retrained none of it
    assert out.count("Running stage 'pretrain_ldm'") == 1, out[-6000:]
    runs = pd.read_csv(sub / "reports/sweep/pool_runs.csv")
    assert sorted(runs["experiment"]) == ["eps2", "eps8"] and set(runs["state"]) == {"COMPLETED"}, runs
    assert runs["workspace"].nunique() == 2 and not any(str(sub) in w for w in runs["workspace"]), runs
    for stages in runs["stages_run"]:
        assert "dp_finetune" in stages and not PUBLIC_UPSTREAM & {s.strip() for s in stages.split(",")}, stages
    # the comparison, built here from the experiments the workers pushed, has both rows with the accountant's epsilon
    table = pd.read_csv(sub / "reports/sweep/comparison.csv").set_index("experiment")
    for name, eps in (("eps2", 2), ("eps8", 8)):
        spent, acc = (float(table.loc[name, c]) for c in ("epsilon_spent", "cnn_accuracy"))
        assert 0.9 * eps < spent <= eps and str(table.loc[name, "private"]).lower() == "true", table
        assert 0 <= acc <= 1
    # nothing private reached the shared DVC remote: the private outputs' hashes, from an experiment's dvc.lock
    ref = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], sub).stdout.split()[0]
    lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], sub).stdout)["stages"]
    pushed = {(p.parent.name + p.name).removesuffix(".dir") for p in remote.rglob("*") if p.is_file()}
    private = {o["md5"].removesuffix(".dir") for st in ("prepare_private", "encode_private") if st in lock
               for o in lock[st]["outs"] if "md5" in o}
    assert private and not private & pushed
