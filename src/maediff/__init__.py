"""maediff: MAEDiff (Xu, Wang, Du 2024) for unsupervised anomaly detection in brain MRI.

Importing the package loads only the configuration; the models (and torch) load on
first use, so that tools which only read results (`maediff report`) stay light.
"""

from . import registry
from ._version import __version__
from .config import Config, get_preset, load_config, save_config


def _import_models() -> None:
    """Register the built-in models and the plug-ins (their import does it)."""
    from . import models  # noqa: F401


# the registry (the bottom of the package) names no model: a lookup that misses asks
# this loader, so that `get_preset("cpu")` or `load_config(...)` work on their own
registry.set_loader(_import_models)


def __getattr__(name: str):
    if name in ("MAEDiff", "build_model", "MODELS"):
        from . import models

        return getattr(models, name)
    if name in ("load_model", "map_scan", "ScanResult"):  # the common case (api.py)
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'maediff' has no attribute {name!r}")


__all__ = [
    "MODELS",
    "Config",
    "MAEDiff",
    "ScanResult",
    "__version__",
    "build_model",
    "get_preset",
    "load_config",
    "load_model",
    "map_scan",
    "save_config",
]
