"""Models that ship with the package, as package data: one safetensors checkpoint each
(weights, config and training record in its metadata, loadable by `load_model` and by
`--model` everywhere) and a model card (NAME.md) that says what it was trained on,
with what, how long it took and the one command that reproduces it.

    from maediff.pretrained import checkpoint_path
    model = load_model(checkpoint_path("maediff-cpu"))
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED = ("maediff-cpu",)


class PretrainedMissing(FileNotFoundError):
    """The package was installed without its model files."""


def _file(name: str, suffix: str) -> Path:
    if name not in SHIPPED:
        raise KeyError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
    path = Path(str(resources.files(__package__) / f"{name}{suffix}"))
    if not path.is_file():
        raise PretrainedMissing(
            f"the shipped model file {path} is missing (an installation without package "
            "data?): reinstall maediff, or train one with `maediff demo --model train`"
        )
    return path


def checkpoint_path(name: str = "maediff-cpu") -> Path:
    """The shipped checkpoint of `name` (a safetensors file)."""
    return _file(name, ".safetensors")


def model_card(name: str = "maediff-cpu") -> str:
    """The model card of `name` (Markdown)."""
    return _file(name, ".md").read_text()


__all__ = ["SHIPPED", "PretrainedMissing", "checkpoint_path", "model_card"]
