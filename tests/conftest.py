import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SPLITS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "splits"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def splits_dir():
    if not SPLITS_DIR.is_dir():
        pytest.skip(f"protocol split CSVs not found at {SPLITS_DIR}")
    return SPLITS_DIR
