"""The model registry: every row of the paper's Tables 1 and 2 is a registered class
plus a configuration (see maediff.config presets).

    model = build_model(get_preset("dae-cpu"))     # cfg.model == "dae"

A new model is one module here with `@register_model("name")` on an AnomalyModel
subclass, and a delta in config.MODEL_DELTAS; the trainer, checkpoints, detection and
the evaluation need no change.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from .base import AnomalyModel, OptimizerGroup, Phase, count_parameters

MODELS: dict[str, type[AnomalyModel]] = {}


def register_model(name: str) -> Callable[[type[AnomalyModel]], type[AnomalyModel]]:
    def add(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = cls
        cls.registry_name = name
        return cls

    return add


def build_model(cfg: Config) -> AnomalyModel:
    if cfg.model not in MODELS:
        raise ValueError(f"model={cfg.model!r} is not registered; choose one of {sorted(MODELS)}")
    return MODELS[cfg.model](cfg)


# importing the modules fills the registry (tests check it against config.MODEL_KINDS)
from . import anoddpm, autoencoders, dae, fanogan, maediff, svae, thresh  # noqa: E402,F401
from .maediff import MAEDiff  # noqa: E402

__all__ = [
    "MODELS",
    "AnomalyModel",
    "MAEDiff",
    "OptimizerGroup",
    "Phase",
    "build_model",
    "count_parameters",
    "register_model",
]
