"""The models: every row of the paper's Tables 1 and 2 is a registered class plus a
preset (a named configuration of it).

    model = build_model(get_preset("dae-cpu"))     # cfg.model == "dae"

A model is one module: its configuration section (a dataclass declared with
registry.register_section, with what each scale makes of it) and its class with

    @register_model("dae", sections=("dae",), presets=(Preset("dae", "DAE", ...),),
                    check=..., describe=...)

Every module of this package is imported with it, so a new built-in
model is one new file. The configuration, validation, presets, row names, the paper's
tables, the CLI and the benchmark read the model from there; the trainer, checkpoints, detection and the
evaluation need no change. A model of another package registers the same way from its
own module, named by an entry point of the group `maediff.models` (docs/plugins.md).
"""

from __future__ import annotations

import warnings

from .. import registry
from ..registry import Preset, check_own_preset
from .base import AnomalyModel, OptimizerGroup, Phase, count_parameters
from .register import MODELS, build_model, register_model

PLUGIN_GROUP = "maediff.models"


class PluginWarning(UserWarning):
    """A model plug-in that failed to load and is left out (the rest of maediff works)."""


def load_plugins() -> list[str]:
    """Import every model of other installed packages (entry point group
    `maediff.models`, docs/plugins.md): an entry point names a module, whose import
    registers its model(s), or a function, which is called. Returns their names.

    A plug-in that fails (an import or syntax error, a name clash with a registered
    model, a preset name against the rules, a model without a preset of its own name)
    costs only itself: what it registered is taken back, a PluginWarning names its
    package and how to remove it, and asking for its model later says why it is
    missing (registry.PLUGIN_FAILURES)."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        before = _registered()
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
            for key in sorted(set(MODELS) - before["models"]):
                check_own_preset(key)
        except Exception as e:  # any error of another package's code, SyntaxError included
            _forget_since(before)
            _report_plugin_failure(ep, e)
            continue
        loaded.append(ep.name)
    return loaded


def _registered() -> dict[str, set[str]]:
    return {
        "models": set(MODELS),
        "specs": set(registry.SPECS),
        "sections": set(registry.SECTIONS),
        "presets": set(registry.PRESETS),
    }


def _forget_since(before: dict[str, set[str]]) -> None:
    """Take back what a failed plug-in registered."""
    for name, table in (
        ("models", MODELS),
        ("specs", registry.SPECS),
        ("sections", registry.SECTIONS),
        ("presets", registry.PRESETS),
    ):
        for key in set(table) - before[name]:
            del table[key]


def _report_plugin_failure(ep, e: Exception) -> None:
    package = ep.dist.name if getattr(ep, "dist", None) is not None else ep.value.split(":")[0]
    reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    line = (
        f"the {PLUGIN_GROUP} plug-in {ep.name!r} of package {package} ({ep.value}) failed to "
        f"load: {type(e).__name__}: {reason}"
    )
    registry.PLUGIN_FAILURES[ep.name] = line
    warnings.warn(
        f"{line}; its models are left out (remove it with: pip uninstall {package})",
        PluginWarning,
        stacklevel=3,
    )


def _import_builtin_models() -> None:
    """Import every module of this package: a model module registers itself, so a new
    built-in model is one new file here and no list names it."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")
    for key in MODELS:
        check_own_preset(key)


_import_builtin_models()
from .maediff import MAEDiff  # noqa: E402

PLUGINS = load_plugins()  # models of other packages, registered like the built-in ones

__all__ = [
    "MODELS",
    "AnomalyModel",
    "PLUGINS",
    "MAEDiff",
    "PluginWarning",
    "OptimizerGroup",
    "Preset",
    "Phase",
    "build_model",
    "count_parameters",
    "load_plugins",
    "register_model",
]
