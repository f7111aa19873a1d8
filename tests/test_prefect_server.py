"""`prefect server start` really starts with our pins, and answers the artifact query our flow's
artifacts are read with (fastapi >= 0.151 broke it)."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_server_starts_and_serves_artifact_filter(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    prefect = str(Path(sys.executable).parent / "prefect")
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}/api"
    try:
        deadline, healthy = time.time() + 120, False
        while time.time() < deadline and proc.poll() is None and not healthy:
            try:
                healthy = urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"true"
            except OSError:
                time.sleep(1)
        assert healthy, f"server did not start: {proc.stdout.read() if proc.poll() is not None else 'timeout'}"
        body = json.dumps({"artifacts": {"key": {"any_": ["x"]}}, "flow_runs": None, "task_runs": None, "limit": 1,
                           "offset": None, "sort": "UPDATED_DESC"}).encode()
        req = urllib.request.Request(f"{base}/artifacts/filter", data=body, headers={"content-type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read()) == []
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
