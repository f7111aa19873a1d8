import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("DPLDM_PROGRESS", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A temporary copy of the repo on the tiny params profile (no stage run yet)."""
    from helpers import tiny_repo

    return tiny_repo(tmp_path_factory.mktemp("tiny") / "repo")
