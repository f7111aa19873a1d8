"""Helpers for tests that run DVC in a temporary copy of the repository."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ["dpldm", "stages", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "pyproject.toml"]


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e.update(DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1", DPLDM_PROGRESS="0", PYTHONPATH=str(ROOT), GIT_AUTHOR_NAME="t",
             GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return e


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def tiny_repo(dest: Path) -> Path:
    """A git+DVC copy of the project with the tiny params profile merged into params.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in COPY:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / item)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load((ROOT / "tests/tiny_params.yaml").read_text()))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "tiny"], dest)
    return dest


def set_param(repo: Path, dotted: str, value) -> None:
    from pipeline.flow import apply_overrides

    apply_overrides(str(repo), {dotted: value})


def dvc_stale(repo: Path) -> set[str]:
    """Stages `dvc status` reports as changed."""
    import json

    out = run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], repo).stdout
    return set(json.loads(out or "{}"))


def params() -> dict:
    """The repository's params.yaml (the one source of defaults)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def cfg(section: str, **overrides):
    """The typed config of a params.yaml section, with some fields replaced (validated again)."""
    import dataclasses

    from dpldm.config import load_section

    return dataclasses.replace(load_section(params(), section), **overrides)


def dataset(**overrides):
    """A DatasetConfig: params.yaml's data.private with uncapped splits and some fields replaced."""
    import dataclasses

    from dpldm.config import load_section

    return dataclasses.replace(load_section(params(), "data").private, **{"n_train": 0, "n_test": 0, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """True once the Prefect server at ``base`` answers /health, False if it exits or times out first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"true":
                return True
        except OSError:
            time.sleep(1)
    return False
