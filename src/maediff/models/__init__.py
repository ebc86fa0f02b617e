"""The model registry: every row of the paper's Tables 1 and 2 is a registered class
plus a configuration (see maediff.config presets).

    model = build_model(get_preset("dae-cpu"))     # cfg.model == "dae"

A new model is one module here with `@register_model("name")` on an AnomalyModel
subclass, and a delta in config.MODEL_DELTAS; the trainer, checkpoints, detection and
the evaluation need no change. A model of another package registers the same way from
its own module, named by an entry point of the group `maediff.models`, and adds its
presets with config.register_preset (docs/plugins.md).
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config, register_kind
from .base import AnomalyModel, OptimizerGroup, Phase, count_parameters

MODELS: dict[str, type[AnomalyModel]] = {}


def register_model(name: str) -> Callable[[type[AnomalyModel]], type[AnomalyModel]]:
    def add(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
            raise TypeError(f"register_model({name!r}) needs an AnomalyModel subclass, got {cls!r}")
        MODELS[name] = cls
        cls.registry_name = name
        register_kind(name)
        return cls

    return add


PLUGIN_GROUP = "maediff.models"


def load_plugins() -> list[str]:
    """Import every model of other installed packages (entry point group
    `maediff.models`, docs/plugins.md): an entry point names a module, whose import
    registers its model(s), or a function, which is called. Returns their names."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as e:
            raise RuntimeError(
                f"the {PLUGIN_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: {e}"
            ) from e
        loaded.append(ep.name)
    return loaded


def build_model(cfg: Config) -> AnomalyModel:
    if cfg.model not in MODELS:
        raise ValueError(f"model={cfg.model!r} is not registered; choose one of {sorted(MODELS)}")
    return MODELS[cfg.model](cfg)


# importing the modules fills the registry (tests check it against config.MODEL_KINDS)
from . import anoddpm, autoencoders, dae, fanogan, maediff, svae, thresh  # noqa: E402,F401
from .maediff import MAEDiff  # noqa: E402

PLUGINS = load_plugins()  # models of other packages, registered like the built-in ones

__all__ = [
    "MODELS",
    "AnomalyModel",
    "PLUGINS",
    "MAEDiff",
    "OptimizerGroup",
    "Phase",
    "build_model",
    "count_parameters",
    "load_plugins",
    "register_model",
]
