import pytest
import torch
from safetensors.torch import save_file

from maediff.config import get_preset
from maediff.models.maediff import MAEDiff
from maediff.training.checkpoint import TrainState
from maediff.weights import CheckpointError, load_model, read_checkpoint, save_weights


def _model():
    torch.manual_seed(0)
    return MAEDiff(get_preset("tiny"))


def test_weights_round_trip_with_config(tmp_path):
    m = _model()
    p = save_weights(m, tmp_path / "w.safetensors", {"step": 7})
    cfg, tensors, extra = read_checkpoint(p)
    assert cfg == m.cfg and extra == {"step": 7}
    m2 = load_model(tmp_path / "w.safetensors")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert not m2.training and m2.checkpoint_info["step"] == 7
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_run_folder_resolves_best_then_last(tmp_path):
    save_weights(_model(), tmp_path / "last.safetensors")
    assert load_model(tmp_path).checkpoint_info["path"].endswith("last.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path / "empty")


def test_truncated_checkpoint(tmp_path):
    p = save_weights(_model(), tmp_path / "w.safetensors")
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match="w.safetensors is truncated, corrupted or not a safetensors file"
    ):
        load_model(p)


def test_corrupted_checkpoint(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_model(p)


def test_foreign_safetensors_file(tmp_path):
    p = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))
    with pytest.raises(CheckpointError, match="other.safetensors is not a maediff file"):
        load_model(p)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "none.safetensors")


@pytest.mark.slow
def test_train_state_round_trip(tmp_path):
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.loss(torch.rand(2, 1, 32, 32), torch.Generator().manual_seed(0)).backward()
    opt.step()
    g = torch.Generator().manual_seed(5)
    torch.rand(3, generator=g)
    state = TrainState(
        step=1, epoch=0, phase=1, phase_step=3, best_val_loss=0.25, last_train_loss=0.5
    )
    state.save(tmp_path / "s.safetensors", m, {"model": opt}, {"noise": g})
    torch.manual_seed(1)
    m2 = MAEDiff(get_preset("tiny"))
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    g2 = torch.Generator()
    loaded, _ = TrainState.load(tmp_path / "s.safetensors", m2, {"model": opt2}, {"noise": g2})
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded == state
    fresh = TrainState(last_train_loss=0.0)  # an infinite best loss survives the JSON metadata
    fresh.save(tmp_path / "f.safetensors", m, {"model": opt}, {"noise": g})
    assert (
        TrainState.load(tmp_path / "f.safetensors", m2, {"model": opt2}, {"noise": g2})[0] == fresh
    )
    with pytest.raises(CheckpointError, match="has optimizers"):
        TrainState.load(tmp_path / "s.safetensors", m2, {"critic": opt2}, {"noise": g2})
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=g2))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name])


def test_loading_never_unpickles(monkeypatch, tmp_path):
    import pickle

    p = save_weights(_model(), tmp_path / "w.safetensors")

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_model(p)
