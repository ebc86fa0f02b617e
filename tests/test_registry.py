"""Every model of the registry through the shared trainer, checkpoints, evaluation and
benchmark: one contract, tested once per model on the tiny scale."""

from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

import maediff.training.trainer as trainer
from maediff.config import Config, apply_overrides, get_preset, to_dict
from maediff.models import MODELS, build_model
from maediff.registry import SECTIONS, SHARED_SECTIONS, SPECS, model_names, model_spec
from maediff.training.checkpoint import TrainState
from maediff.training.data import prepare_training_data
from maediff.training.trainer import train
from maediff.weights import load_model, read_checkpoint

TRAINABLE = sorted(n for n, c in MODELS.items() if c.trainable)
SRC = Path(__file__).resolve().parents[1] / "src" / "maediff"


def _tiny(model: str, *extra: str) -> Config:
    name = {"maediff": "tiny"}.get(model, f"{model}-tiny")
    return apply_overrides(
        get_preset(name), ["train.batch_size=4", "train.checkpoint_every=1", *extra]
    )


def test_the_names_of_a_model_follow_one_rule():
    """Every registry key is also a preset name (the model's own row); further
    presets of the same class are variants; preset names are lower-case words joined by
    '-', and row names are unique."""
    from maediff.registry import preset_info

    rows = []
    for key, spec in SPECS.items():
        names = [p.name for p in spec.presets]
        assert key in names, f"model {key!r} has no preset of its own name: {names}"
        for n in names:
            assert n == n.lower() and " " not in n and preset_info(n).row
            rows.append(preset_info(n).row)
    assert len(rows) == len(set(rows))


def test_every_preset_builds_its_model_with_its_own_sections_only():
    assert sorted(MODELS) == sorted(SPECS)  # one decorator fills both
    for name in model_names():
        cfg = get_preset(f"{name}-tiny")
        assert build_model(cfg).cfg.model == cfg.model
        own = model_spec(cfg.model).sections
        assert list(to_dict(cfg)) == ["name", "model", "geometry", *own, *SHARED_SECTIONS[1:]]
    with pytest.raises(ValueError, match="model='nope'"):
        Config(model="nope")


def config_reads(sources: dict) -> set[tuple[str, str]]:
    """(section, field) pairs the code reads: `X.section.field`; `name.field` where `name`
    is bound to `X.section` in the same function, or is a parameter annotated with the
    section's class (`cfg: UNetConfig`); and `self.attr.field` where the class stores
    such a parameter as `self.attr`."""
    import ast

    by_class = {type(getattr(Config(), n)).__name__: n for n in SHARED_SECTIONS}
    by_class.update({s.cls.__name__: n for n, s in SECTIONS.items()})

    def annotated(arg: ast.arg) -> str | None:
        a = arg.annotation
        name = a.id if isinstance(a, ast.Name) else a.value if isinstance(a, ast.Constant) else None
        if isinstance(a, ast.BinOp):  # `UNetConfig | None`
            name = a.left.id if isinstance(a.left, ast.Name) else None
        return by_class.get(name) if isinstance(name, str) else None

    def typed(node: ast.AST) -> str | None:
        """The section of `X.section(UNetConfig)`, the typed accessor."""
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "section"):
            return None
        arg = node.args[0] if node.args else None
        return by_class.get(arg.id) if isinstance(arg, ast.Name) else None

    reads: set[tuple[str, str]] = set()
    for text in sources.values():
        tree = ast.parse(text)
        classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.Lambda)]
        for scope in [*scopes, tree]:
            alias: dict[str, str] = {}
            if isinstance(scope, ast.FunctionDef | ast.Lambda):
                for arg in scope.args.args + scope.args.kwonlyargs:
                    if arg.annotation is not None and (sec := annotated(arg)):
                        alias[arg.arg] = sec
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign):
                    tgts, vals = node.targets[0], node.value
                    pairs = (
                        zip(tgts.elts, vals.elts)
                        if isinstance(tgts, ast.Tuple) and isinstance(vals, ast.Tuple)
                        else [(tgts, vals)]
                    )
                    for tgt, val in pairs:
                        if isinstance(tgt, ast.Name) and isinstance(val, ast.Attribute):
                            alias[tgt.id] = val.attr
                        elif isinstance(tgt, ast.Name) and (sec := typed(val)):
                            alias[tgt.id] = sec
            for node in ast.walk(scope):
                if isinstance(node, ast.Attribute):
                    v = node.value
                    if isinstance(v, ast.Attribute):
                        reads.add((v.attr, node.attr))
                    elif sec := typed(v):
                        reads.add((sec, node.attr))
                    elif isinstance(v, ast.Name) and v.id in alias:
                        reads.add((alias[v.id], node.attr))
        for cls in classes:  # self.attr = <annotated parameter>: self.attr.field reads
            stored: dict[str, str] = {}
            for fn in [n for n in cls.body if isinstance(n, ast.FunctionDef)]:
                params = {
                    a.arg: sec
                    for a in fn.args.args
                    if a.annotation is not None and (sec := annotated(a))
                }
                for node in ast.walk(fn):
                    if (
                        isinstance(node, ast.Assign)
                        and isinstance(node.targets[0], ast.Attribute)
                        and isinstance(node.value, ast.Name)
                        and node.value.id in params
                    ):
                        stored[node.targets[0].attr] = params[node.value.id]
            local = {  # c = self.cfg
                n.targets[0].id: stored[n.value.attr]
                for n in ast.walk(cls)
                if isinstance(n, ast.Assign)
                and isinstance(n.targets[0], ast.Name)
                and isinstance(n.value, ast.Attribute)
                and n.value.attr in stored
            }
            for node in ast.walk(cls):
                if not isinstance(node, ast.Attribute):
                    continue
                if isinstance(node.value, ast.Attribute) and node.value.attr in stored:
                    reads.add((stored[node.value.attr], node.attr))
                elif isinstance(node.value, ast.Name) and node.value.id in local:
                    reads.add((local[node.value.id], node.attr))
    return reads


def unread_fields(sources: dict) -> list[str]:
    reads = config_reads(sources)
    unused = []
    types = {n: type(getattr(Config(), n)) for n in SHARED_SECTIONS}
    types.update({n: s.cls for n, s in SECTIONS.items()})
    for name, cls in types.items():
        unused += [f"{name}.{f.name}" for f in fields(cls) if (name, f.name) not in reads]
    return unused


def test_every_config_field_is_read_by_some_code():
    """A field that no module reads as `.section.field` or `.section(SectionType).field`
    (or through a local name bound to either) is an option that does nothing. Sections
    are declared beside the code that reads them; their own checks (`self.field` in
    __post_init__) and the scales'
    `lambda s: replace(s, ...)` are not reads."""
    sources = {p: p.read_text() for p in SRC.rglob("*.py") if p.name != "config.py"}
    assert not unread_fields(sources), f"config fields no code reads: {unread_fields(sources)}"
    # the check sees a field disappear: drop every read of train.warmup_steps
    pruned = {p: t.replace("warmup_steps", "warmup_gone") for p, t in sources.items()}
    assert unread_fields(pruned) == ["train.warmup_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("model", TRAINABLE)
def test_train_save_load_and_reconstruct(model, tiny_bench, tmp_path):
    cfg = _tiny(model, "train.max_steps=6", "train.epochs=1000")
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    summary = train(cfg, data, tmp_path / "run", device="cpu", progress=False, log_every=1)
    assert summary["steps"] == 6 and summary["model"] == cfg.model
    loaded = load_model(tmp_path / "run")
    # the saved config is the given one plus the landmarks learned from the training data
    # and the record of what it was trained on (data/qc.py)
    assert loaded.cfg.data.landmarks == data.landmarks
    assert loaded.cfg.data.trained_on == data.record and data.record.scans > 0
    assert type(loaded) is MODELS[cfg.model] and loaded.cfg == replace(
        cfg, data=replace(cfg.data, landmarks=data.landmarks, trained_on=data.record)
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
    kw = {"device": "cpu", "progress": False, "log_every": 1}
    train(cfg, data, tmp_path / "ref", **kw)
    with monkeypatch.context() as m:
        _crash_after_checkpoints(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data, tmp_path / "run", **kw)
    torch.manual_seed(123)  # the resumed run must not depend on the global state left behind
    train(cfg, data, tmp_path / "run", resume=True, **kw)
    a = read_checkpoint(tmp_path / "ref" / "last.safetensors")[1]
    b = read_checkpoint(tmp_path / "run" / "last.safetensors")[1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the log goes on as it was: the same rows, the smoothed loss included
    assert _log_rows(tmp_path / "run") == _log_rows(tmp_path / "ref")


def _log_rows(run_dir: Path) -> list[dict]:
    import csv

    with (run_dir / "log.csv").open() as f:
        rows = [
            {k: v for k, v in r.items() if k not in ("time_s", "steps_per_s")}
            for r in csv.DictReader(f)
        ]
    assert any(r["train_loss"] for r in rows)
    return rows


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
def test_fanogan_resumes_exactly_from_the_stage_boundary_under_an_epoch_budget(
    tiny_bench, tmp_path, monkeypatch
):
    """The stage-boundary checkpoint ends an epoch: it must count that epoch, or a run
    resumed from it trains one epoch more than an uninterrupted one."""
    cfg = _tiny("fanogan", "train.max_steps=0", "train.epochs=4", "train.checkpoint_every=1000")
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    whole = train(cfg, data, tmp_path / "whole", device="cpu", progress=False)
    with monkeypatch.context() as m:
        _crash_after_checkpoints(m, 1)  # the first checkpoint is the stage boundary
        with pytest.raises(KeyboardInterrupt):
            train(cfg, data, tmp_path / "run", device="cpu", progress=False)
    resumed = train(cfg, data, tmp_path / "run", device="cpu", progress=False, resume=True)
    assert resumed["steps"] == whole["steps"] and resumed["epochs"] == whole["epochs"] == 4
    a = read_checkpoint(tmp_path / "whole" / "last.safetensors")[1]
    b = read_checkpoint(tmp_path / "run" / "last.safetensors")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    assert set(s.datasets) == {"Brats21", "MSLUB", "IXI"}
    assert 0.0 <= s.mean("Brats21", "auprc") <= 1.0
    assert s.mean("IXI", "l1") > 0


def test_a_model_without_training_refuses_to_train(tiny_bench, tmp_path):
    cfg = get_preset("thresh-tiny")
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(cfg, data, tmp_path / "run", device="cpu", progress=False)
