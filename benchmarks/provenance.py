"""The first line of every benchmark table (the exact command, the commit and when and where it ran), and the
writing of the table."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


# The commit of the code this process runs: read when the benchmark starts (it imports this module first), not when
# it writes its table, which may be an hour later, after new commits.
STARTED_AT = _head()


# environment variables that hold PyTorch, oneDNN and MKL below the processor's widest instruction set
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu() -> str:
    """The processor, as far as the OS says: its model name and widest x86 vector extension ("AMD EPYC, AVX2").
    Timings and even trained weights depend on it (oneDNN and BLAS pick kernels, and so summation orders, by
    instruction set), and the machine this project runs on is not always the same one. A cap set in the environment
    (``ISA_CAPS``) is named after them ("..., held by ONEDNN_MAX_CPU_ISA=AVX2")."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "cpu unknown"
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                              if line.split(":", 1)[0].strip() == key), "")
    flags = set(field("flags").split())
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in flags), "")
    caps = " ".join(f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k))
    return ", ".join(x for x in (field("model name") or platform.processor(), isa, caps and f"held by {caps}") if x) or "cpu unknown"


def provenance(script: str, argv: list[str] | None, started: datetime.datetime, commit: str | None = None) -> str:
    """```python benchmarks/<script> <argv>```, commit, start time (UTC) and machine, as one Markdown line.
    ``argv`` None means this process's own arguments; ``commit`` None means the checkout's HEAD when this process
    started (a script that runs another commit, such as repro_time.py's clone, passes that one)."""
    if commit is None:
        commit = STARTED_AT
    cmd = shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    return f"`{cmd}`, commit {commit or 'unknown'}, started {started:%Y-%m-%d %H:%M} UTC, {platform.machine()} ({cpu()}), {sys.platform}."


def with_ext(out, ext: str) -> Path:
    """``out`` (a benchmark's ``--out``: a stem, or a file name with a table's extension) with extension ``ext``
    (".md", ".csv", ".png"). Unlike ``Path.with_suffix``, a stem with dots keeps them: "betas_0.9,0.999" gives
    "betas_0.9,0.999.md", not "betas_0.9,0.md" (which a second stem "betas_0.9,0.99" would overwrite)."""
    out = Path(out)
    return out.with_suffix(ext) if out.suffix in (".md", ".csv", ".png") else out.parent / (out.name + ext)


def write_table(path, lines: list[str], *, echo: list[str] | None = None) -> None:
    """Writes a benchmark's Markdown ``lines`` to ``path`` (its folder made if missing) and prints ``echo`` (default:
    all of them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines if echo is None else echo))
