"""The stages' process setup (stages.common): glibc's malloc keeps freed memory for reuse."""
import json
import os
import platform
import subprocess
import sys

import pytest

from helpers import ROOT

# Allocates and frees a 64 MiB tensor five times (warm-up), then twenty more; prints the minor page faults of the twenty.
PROBE = """
import json, resource, sys
import torch
from stages.common import keep_freed_memory
took = keep_freed_memory()
for _ in range(5):
    a = torch.ones(16 << 20)
    del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = torch.ones(16 << 20)
    del a
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(malloc: str) -> dict:
    env = {**os.environ, "DPLDM_MALLOC": malloc, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept, default = probe("keep"), probe("default")
    assert kept["took"] is True and default["took"] is False
    pages = (16 << 20) * 4 // 4096  # one 64 MiB tensor in 4 KiB pages
    # glibc's default maps each 64 MiB block afresh: every one of the twenty passes faults all its pages in again
    assert default["faults"] >= 16 * pages
    # kept: the heap reuses what was freed; a few blocks' worth of faults at most (0-3 of 20 seen here), not one per pass
    assert kept["faults"] < 6 * pages


def test_dpldm_malloc_default_leaves_glibc_alone_and_a_bad_value_is_named(monkeypatch):
    from dpldm.config import ConfigError
    from stages.common import keep_freed_memory

    monkeypatch.setenv("DPLDM_MALLOC", "default")
    assert keep_freed_memory() is False
    monkeypatch.setenv("DPLDM_MALLOC", "off")
    with pytest.raises(ConfigError, match="DPLDM_MALLOC = 'off'.*'keep'.*'default'"):
        keep_freed_memory()
