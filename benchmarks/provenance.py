"""The first line of every benchmark table: the exact command, the commit and when and where it ran."""
from __future__ import annotations

import datetime
import platform
import shlex
import subprocess
import sys


def provenance(script: str, argv: list[str] | None, started: datetime.datetime, commit: str | None = None) -> str:
    """```python benchmarks/<script> <argv>```, commit, start time (UTC) and machine, as one Markdown line.
    ``argv`` None means this process's own arguments; ``commit`` None means this checkout's HEAD now (a script that
    runs another commit, or runs long while HEAD may move, passes the one it ran)."""
    if commit is None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cmd = shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    return f"`{cmd}`, commit {commit or 'unknown'}, started {started:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {sys.platform}."
