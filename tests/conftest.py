import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (``make test``: two workers on two cores) every process gets one thread: the workers and
# the stage processes they start run side by side, and OpenMP threads beyond the cores spin against each other
# (a tiny dp_finetune took 190 s at 2 threads beside another 2-thread job, 28 s at 1). Subprocesses inherit it.
UNDER_XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if UNDER_XDIST:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
import torch  # noqa: E402  (after the thread variables, which numpy's BLAS reads on import)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("DPLDM_PROGRESS", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
torch.set_num_threads(1 if UNDER_XDIST else 2)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A temporary copy of the repo on the tiny params profile (no stage run yet)."""
    from helpers import tiny_repo

    return tiny_repo(tmp_path_factory.mktemp("tiny") / "repo")
