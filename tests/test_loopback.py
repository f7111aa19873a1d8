"""A sweep spread over Prefect workers, end to end on loopback with real parts: `prefect server start` on
127.0.0.1 (with our pins: it starts, and answers the artifact query the flows read with, which
fastapi >= 0.151 broke), a process work pool, two workers each started in its own clone, a bare git
repository and a local folder as the git and DVC remotes, the tiny profile, two epsilons (pipeline/pool.py).
One worker is killed (its whole process group, as a machine dies) during the first dp_finetune: Prefect's
heartbeat automation marks its run Crashed, the submitter resubmits it, the other worker takes it after
its own setting (two settings back to back on one worker), and the ledger counts the lost attempt."""
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from helpers import env as base_env
from helpers import free_port, run, tiny_repo, wait_healthy

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PUBLIC_UPSTREAM = {"prepare_public", "pretrain_ae", "encode_public", "pretrain_ldm"}


def tree_of(pid: int) -> list[psutil.Process]:
    """The process and everything under it (flow runs sit in process groups of their own)."""
    try:
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()  # SIGKILL
        except psutil.NoSuchProcess:
            pass


def stop_tree(p: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process's group, then SIGKILL to it and everything under it still alive after ``grace``
    seconds: no server or worker outlives the test."""
    tree = tree_of(p.pid)
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    kill_all(alive)
    psutil.wait_procs(alive, timeout=10)


def test_sweep_on_two_workers_shares_the_upstream_survives_a_dead_worker_and_compares_both(tmp_path, request):
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
    procs, tmps = [], {}

    def start(cmd, cwd, log, **extra_env):
        fh = open(tmp_path / log, "w")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env={**env, **extra_env}, stdout=fh, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    def sh(cmd, cwd, timeout=600):
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
        return p.stdout

    try:
        start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], tmp_path, "server.log")
        assert wait_healthy(f"http://127.0.0.1:{port}/api", procs[0]), (tmp_path / "server.log").read_text()[-3000:]
        sh([str(BIN / "prefect"), "work-pool", "create", "loop", "--type", "process"], tmp_path)
        sub = tmp_path / "submitter"
        print(sh([sys.executable, "-m", "pipeline.pool", "deploy", "--pool", "loop", "--source", str(bare), "--branch", branch,
                  "--heartbeat", "30", "--zombie-after", "45"], sub))
        workers = {}
        for w in ("worker1", "worker2"):  # each clones its flow runs into its own temp folder; a short path:
            # multiprocessing binds unix sockets under TMPDIR (at most 107 bytes), and under pytest-xdist a folder
            # in tmp_path is long enough that the stages' DataLoader workers hang on it
            tmps[w] = Path(tempfile.mkdtemp(prefix=f"dpldm-{w}-"))
            request.addfinalizer(lambda d=tmps[w]: shutil.rmtree(d, ignore_errors=True))
            workers[w] = start([str(BIN / "prefect"), "worker", "start", "--pool", "loop", "--type", "process", "--limit", "1"],
                               tmp_path / w, f"{w}.log", TMPDIR=str(tmps[w]))
        submitter = start([sys.executable, "-m", "pipeline.sweep", "--pool", "dpldm-setting/loop", "--epsilons", "2", "8",
                           "--out", "reports/sweep"], sub, "submitter.log")
        killed, deadline = None, time.time() + 900
        while killed is None and time.time() < deadline and submitter.poll() is None:
            for w in workers:  # the first dp_finetune to start (its attempt record is written before training)
                if list(tmps[w].glob("*/*/models/checkpoints/dp_finetune/attempts.json")):
                    # as a machine dies: the worker and every process under it (Prefect starts each flow run in
                    # a process group of its own, so killing the worker's group alone would leave the run going)
                    kill_all(tree_of(workers[w].pid))
                    killed = w
                    break
            time.sleep(0.1)
        assert killed, (tmp_path / "submitter.log").read_text()[-6000:]
        assert submitter.wait(timeout=1500) == 0, (tmp_path / "submitter.log").read_text()[-6000:]
        out = (tmp_path / "submitter.log").read_text()
        body = json.dumps({"artifacts": {"key": {"any_": ["x"]}}, "flow_runs": None, "task_runs": None, "limit": 1,
                           "offset": None, "sort": "UPDATED_DESC"}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/artifacts/filter", data=body,
                                     headers={"content-type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read()) == []
    finally:
        for p in procs:
            stop_tree(p)
    print(out[-3000:])
    # the upstream ran once, here; every setting ran on a worker, in a clone of its own, and retrained none of it
    assert out.count("Running stage 'pretrain_ldm'") == 1, out[-6000:]
    runs = pd.read_csv(sub / "reports/sweep/pool_runs.csv").set_index("experiment")
    print(runs.to_markdown())
    assert sorted(runs.index) == ["eps2", "eps8"] and set(runs["state"]) == {"COMPLETED"}, runs
    assert runs["workspace"].nunique() == 2 and not any(str(sub) in w for w in runs["workspace"]), runs
    # the killed run died in dp_finetune (no ledger in its clone), was marked Crashed, and resubmitted once
    (dead,) = tmps[killed].glob("*/*/models/checkpoints/dp_finetune/attempts.json")
    dead_clone = dead.parents[3]
    assert not (dead_clone / "reports/dp_finetune/ledger.json").exists()
    lost = runs[runs["lost_runs"] > 0]
    assert len(lost) == 1 and "resubmitted" in out, runs
    lost_name = lost.index[0]
    assert not any(str(dead_clone) == w for w in runs["workspace"])
    # both settings completed on the surviving worker, one after the other, each in its own fresh clone
    assert runs["worker"].nunique() == 1, runs
    for stages in runs["stages_run"]:
        assert "dp_finetune" in stages and not PUBLIC_UPSTREAM & {s.strip() for s in stages.split(",")}, stages
    # the comparison, built here from the experiments the workers pushed, has both rows with the accountant's epsilon;
    # the resubmitted setting's ledger counts the lost attempt at its target epsilon, the other's counts one attempt
    table = pd.read_csv(sub / "reports/sweep/comparison.csv").set_index("experiment")
    print(table[["epsilon_target", "epsilon_spent", "attempt", "epsilon_spent_all_attempts"]].to_markdown())
    for name, eps in (("eps2", 2), ("eps8", 8)):
        spent, acc, total = (float(table.loc[name, c]) for c in ("epsilon_spent", "cnn_accuracy", "epsilon_spent_all_attempts"))
        assert 0.9 * eps < spent <= eps and str(table.loc[name, "private"]).lower() == "true", table
        assert 0 <= acc <= 1
        attempts = 2 if name == lost_name else 1
        assert float(table.loc[name, "attempt"]) == attempts
        assert total == pytest.approx(spent + (eps if attempts == 2 else 0), rel=1e-6), table
    # neither setting inherited the other's override: each experiment's params are the committed ones plus its own
    for ref in run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], sub).stdout.split():
        exp_params = yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], sub).stdout)
        name = ref.rsplit("/", 1)[-1]
        assert exp_params["finetune"]["epsilon"] == {"eps2": 2, "eps8": 8}[name], (name, exp_params["finetune"])
    # nothing private reached the shared DVC remote: the private outputs' hashes, from an experiment's dvc.lock
    ref = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], sub).stdout.split()[0]
    lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], sub).stdout)["stages"]
    pushed = {(p.parent.name + p.name).removesuffix(".dir") for p in remote.rglob("*") if p.is_file()}
    private = {o["md5"].removesuffix(".dir") for st in ("prepare_private", "encode_private") if st in lock
               for o in lock[st]["outs"] if "md5" in o}
    assert private and not private & pushed
