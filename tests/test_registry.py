"""Every model of the registry through the shared trainer, checkpoints, evaluation and
benchmark: one contract, tested once per model on the tiny scale."""

import re
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest
import torch

import maediff.training.trainer as trainer
from maediff.config import MODEL_KINDS, TABLE1, Config, apply_overrides, get_preset
from maediff.models import MODELS, build_model
from maediff.training.checkpoint import TrainState, load_model, read_checkpoint
from maediff.training.trainer import prepare_training_data, train

TRAINABLE = sorted(n for n, c in MODELS.items() if c.trainable)
SRC = Path(__file__).resolve().parents[1] / "src" / "maediff"


def _tiny(model: str, *extra: str) -> Config:
    name = {"maediff": "tiny"}.get(model, f"{model}-tiny")
    return apply_overrides(
        get_preset(name), ["train.batch_size=4", "train.checkpoint_every=1", *extra]
    )


def test_registry_holds_every_model_of_the_config():
    assert sorted(MODELS) == sorted(MODEL_KINDS)
    for name in TABLE1:
        cfg = get_preset(f"{name}-tiny")
        assert build_model(cfg).cfg.model == cfg.model
    with pytest.raises(ValueError, match="model='nope'"):
        Config(model="nope")


def test_every_config_field_is_read_by_some_code():
    """A field that no module besides config.py mentions is an option that does nothing."""
    modules = {p: p.read_text() for p in SRC.rglob("*.py") if p.name != "config.py"}
    unused = []
    for section in fields(Config):
        default = getattr(Config(), section.name)
        if not is_dataclass(default):
            continue
        cls_name = type(default).__name__
        for f in fields(default):
            used = any(
                re.search(rf"\.{f.name}\b", text)
                and (f".{section.name}" in text or cls_name in text)
                for text in modules.values()
            )
            if not used:
                unused.append(f"{section.name}.{f.name}")
    assert not unused, f"config fields no code reads: {unused}"


@pytest.mark.slow
@pytest.mark.parametrize("model", TRAINABLE)
def test_train_save_load_and_reconstruct(model, tiny_bench, tmp_path):
    cfg = _tiny(model, "train.max_steps=6", "train.epochs=1000")
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    summary = train(cfg, data, tmp_path / "run", device="cpu", progress=False, log_every=1)
    assert summary["steps"] == 6 and summary["model"] == cfg.model
    loaded = load_model(tmp_path / "run")
    # the saved config is the given one plus the landmarks learned from the training data
    assert loaded.cfg.data.landmarks == data.landmarks
    assert type(loaded) is MODELS[cfg.model] and loaded.cfg == replace(
        cfg, data=replace(cfg.data, landmarks=data.landmarks)
    )
    _, tensors, extra = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert extra["step"] == 6
    x = torch.rand(5, 1, 32, 32)
    rec = loaded.reconstruct(x, torch.Generator().manual_seed(0))
    assert rec.shape == x.shape and torch.isfinite(rec).all()


def _crash_after_checkpoints(monkeypatch, n: int) -> None:
    """Stop the process as kill -9 would, right after the n-th checkpoint is written."""
    real, count = trainer._checkpoint, {"n": 0}

    def checkpoint_then_die(run):
        real(run)
        count["n"] += 1
        if count["n"] == n:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(trainer, "_checkpoint", checkpoint_then_die)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["maediff", "dae", "svae"])
def test_resume_in_process_gives_the_same_weights(model, tiny_bench, tmp_path, monkeypatch):
    cfg = _tiny(model, "train.epochs=4")
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    train(cfg, data, tmp_path / "ref", device="cpu", progress=False)
    with monkeypatch.context() as m:
        _crash_after_checkpoints(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data, tmp_path / "run", device="cpu", progress=False)
    torch.manual_seed(123)  # the resumed run must not depend on the global state left behind
    train(cfg, data, tmp_path / "run", device="cpu", progress=False, resume=True)
    a = read_checkpoint(tmp_path / "ref" / "last.safetensors")[1]
    b = read_checkpoint(tmp_path / "run" / "last.safetensors")[1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_fanogan_resumes_across_the_stage_boundary(tiny_bench, tmp_path, monkeypatch):
    cfg = _tiny("fanogan", "train.max_steps=24", "train.epochs=1000", "train.checkpoint_every=1000")
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    with monkeypatch.context() as m:
        _crash_after_checkpoints(m, 1)  # the first checkpoint is the stage boundary
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data, tmp_path / "run", device="cpu", progress=False)
    model = build_model(cfg)
    opts = trainer.build_optimizers(model, cfg)
    gens = {n: torch.Generator() for n in ("data", "noise", "global")}
    state, _ = TrainState.load(tmp_path / "run" / "last.state.safetensors", model, opts, gens)
    assert state.phase == 1 and state.phase_step == 0
    assert 0 < state.step < 24
    boundary = {k: v.clone() for k, v in model.state_dict().items()}
    summary = train(cfg, data, tmp_path / "run", device="cpu", progress=False, resume=True)
    assert summary["steps"] == 24
    after = read_checkpoint(tmp_path / "run" / "last.safetensors")[1]
    frozen = [k for k in after if not k.startswith("encoder.")]
    trained = [k for k in after if k.startswith("encoder.")]
    assert frozen and trained
    assert all(torch.equal(after[k], boundary[k]) for k in frozen)  # G and D stay fixed
    assert any(not torch.equal(after[k], boundary[k]) for k in trained)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["thresh", "ae", "svae", "fanogan", "anoddpm"])
def test_every_model_goes_through_the_protocol(model, tiny_bench, tmp_path):
    from maediff.pipeline.evaluate import evaluate_model

    cfg = _tiny(model, "train.max_steps=3", "train.epochs=1000")
    if MODELS[cfg.model].trainable:
        data = prepare_training_data(cfg, tiny_bench, progress=False)
        train(cfg, data, tmp_path / "run", device="cpu", progress=False)
        m = load_model(tmp_path / "run")
    else:
        m = build_model(cfg)
    s = evaluate_model(m, tiny_bench, tmp_path / "eval", label=model, progress=False, figures=False)
    assert set(s["datasets"]) == {"Brats21", "MSLUB", "IXI"}
    assert 0.0 <= s["datasets"]["Brats21"]["metrics"]["auprc"]["mean"] <= 1.0
    assert s["datasets"]["IXI"]["metrics"]["l1"]["mean"] > 0


def test_a_model_without_training_refuses_to_train(tiny_bench, tmp_path):
    cfg = get_preset("thresh-tiny")
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(cfg, data, tmp_path / "run", device="cpu", progress=False)
