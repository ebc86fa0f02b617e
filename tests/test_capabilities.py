"""The shared layers (pipeline/, training/, evaluation/) name no model: what they need
of one is a method or a declared capability of its class (models/base.py)."""

import ast
from pathlib import Path

import pytest
import torch

import maediff
from maediff.benchmark.plan import budget_of
from maediff.benchmark.probe import mae_input_dependence, patch_probe
from maediff.config import get_preset
from maediff.models import MODELS, build_model
from maediff.registry import preset_name
from maediff.scales import with_update_budget

SHARED = ("pipeline", "benchmark", "training", "evaluation", "reporting")
ROOT = Path(maediff.__file__).parent


def _names_of_models(path: Path) -> list[str]:
    """Where a module names a model: imports a model's own module, uses a model class,
    or compares a configuration's `model` with a literal name."""
    classes = {cls.__name__ for cls in MODELS.values()}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if "models" in parts and parts[-1] not in ("models", "base"):
                found.append(f"imports {node.module}")
        elif isinstance(node, ast.Name) and node.id in classes:
            found.append(f"uses {node.id}")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "model" for s in sides) and any(
                isinstance(s, ast.Constant) and s.value in MODELS for s in sides
            ):
                found.append(f"compares .model with a name (line {node.lineno})")
    return found


def test_the_shared_layers_name_no_model():
    named = {
        f"{p.relative_to(ROOT)}: {what}"
        for folder in SHARED
        for p in sorted((ROOT / folder).glob("*.py"))
        for what in _names_of_models(p)
    }
    assert not named, "\n".join(sorted(named))


def test_a_model_says_its_own_update_budget():
    """f-AnoGAN's table entry is the split its update_budget made, read back."""
    cfg = with_update_budget(get_preset(preset_name("fanogan", "tiny")), 10)
    critic = 10 * cfg.fanogan.n_critic
    assert budget_of(cfg) == (
        f"10 generator + 10 encoder updates (and {critic} critic updates), "
        f"{cfg.train.batch_size} slices each"
    )
    dae = with_update_budget(get_preset(preset_name("dae", "tiny")), 7)
    assert budget_of(dae) == f"7 updates of {dae.train.batch_size} slices"


def test_the_probe_measures_only_models_that_declare_it():
    ae = build_model(get_preset("ae-tiny"))
    assert not ae.patch_probe and MODELS["maediff"].patch_probe
    x = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="declares no patch probe"):
        patch_probe(ae, x, x > 0.5)
    with pytest.raises(ValueError, match="declares no patch probe"):
        mae_input_dependence(ae, x)


def test_old_runs_clamp_as_their_model_declares():
    from maediff.weights import saved_config

    for name, cls in MODELS.items():
        cfg = saved_config({"model": name, "inference": {"batch_size": 4}})
        assert cfg.inference.clamp == cls.clamped_before_0_5
    assert not MODELS["maediff"].clamped_before_0_5 and MODELS["dae"].clamped_before_0_5


def _second_contract(path: Path) -> list[str]:
    """Where a shared module reads a model duck-typed: `getattr(x, name, default)`, or a
    model's configuration section by name (`section("diffusion")`, `cfg.diffusion`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr":
            if len(node.args) == 3:
                found.append(f"getattr with a default (line {node.lineno})")
        elif isinstance(node, ast.Attribute) and node.attr == "diffusion":
            found.append(f".diffusion (line {node.lineno})")
        elif isinstance(node, ast.Constant) and node.value == "diffusion":
            found.append(f'"diffusion" (line {node.lineno})')
    return found


def test_the_pipeline_asks_the_model_contract_only():
    """One model contract (models/base.py): what the pipeline, the benchmark and
    training need of a model is a method or a declared capability, its default in
    AnomalyModel; none restates a default with getattr or reads a model's section."""
    named = {
        f"{p.relative_to(ROOT)}: {what}"
        for folder in ("pipeline", "benchmark", "training", "evaluation", "reporting")
        for p in sorted((ROOT / folder).glob("*.py"))
        for what in _second_contract(p)
    }
    assert not named, "\n".join(sorted(named))


def test_the_test_noise_level_is_a_declared_capability():
    dae = build_model(get_preset("dae-tiny"))
    assert (dae.t_test, dae.timesteps, dae.t_test_range()) == (None, None, None)
    with pytest.raises(ValueError, match="'dae' has no t_test"):
        dae.set_t_test(300)
    m = build_model(get_preset("tiny"))
    d = m.cfg.diffusion
    assert (m.t_test, m.timesteps, m.t_test_range()) == (
        d.t_test,
        d.timesteps,
        (d.sample_steps, d.timesteps),
    )
    m.set_t_test(321)
    assert m.t_test == 321 == m.cfg.diffusion.t_test
