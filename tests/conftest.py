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


def tiny_synth_config():
    """The sizes of the small synthetic benchmark of the slower tests."""
    from maediff.data.synthetic import SynthConfig

    return SynthConfig(
        seed=0,
        healthy_trainval=6,
        healthy_test=2,
        tumour_val=1,
        tumour_test=2,
        ms_val=1,
        ms_test=1,
        workers=1,
    )


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """A small synthetic benchmark in pDDPM's layout, shared by the slower tests."""
    from maediff.data.synthetic import generate_benchmark

    root = tmp_path_factory.mktemp("bench") / "data"
    return generate_benchmark(root, tiny_synth_config(), progress=False)


def draw_zero_layers(model, gen, std: float = 0.05):
    """Draw the zero-initialised layers of an untrained model (output convs, attention
    projections) so that its outputs depend on the input; returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model
