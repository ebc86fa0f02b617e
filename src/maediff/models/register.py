"""The table of model classes: `register_model` (the decorator a model module puts on
its class) and `build_model`. A registration fills two tables: the class here, its
spec (sections, presets, checks, description) in maediff.registry, which the
configuration reads without importing any model."""

from __future__ import annotations

from collections.abc import Callable

from .. import registry
from ..config import Config
from ..registry import ModelSpec, Preset, register_spec
from .base import AnomalyModel

MODELS: dict[str, type[AnomalyModel]] = {}


def register_model(
    name: str,
    *,
    sections: tuple[str, ...] = (),
    presets: tuple[Preset, ...] = (),
    check: Callable[[Config], None] | None = None,
    describe: Callable[[Config], str] | None = None,
    update_budget: Callable[[Config, int], Config] | None = None,
    options: tuple[str, ...] = (),
) -> Callable[[type[AnomalyModel]], type[AnomalyModel]]:
    """Register an AnomalyModel subclass as model `name` (a Config's `model`), with
    everything the configuration needs to know of it (registry.ModelSpec): the config
    sections it reads, its presets, its cross-section checks and its description."""

    def add(cls: type[AnomalyModel]) -> type[AnomalyModel]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, AnomalyModel)):
            raise TypeError(f"register_model({name!r}) needs an AnomalyModel subclass, got {cls!r}")
        register_spec(
            ModelSpec(
                name,
                tuple(sections),
                tuple(presets),
                check,
                describe,
                update_budget,
                tuple(options),
            )
        )
        MODELS[name] = cls
        cls.registry_name = name
        return cls

    return add


def build_model(cfg: Config) -> AnomalyModel:
    if cfg.model not in MODELS:
        note = registry.PLUGIN_FAILURES.get(cfg.model)
        raise ValueError(
            f"model={cfg.model!r} is not registered; choose one of {sorted(MODELS)}"
            + (f"; {note}" if note else "")
        )
    return MODELS[cfg.model](cfg)


__all__ = ["MODELS", "build_model", "register_model"]
