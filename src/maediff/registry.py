"""The model registry: what the configuration knows of every model, and nothing else.

The bottom of the package: it imports no other maediff module. A model is declared
once, in its own module (maediff/models/*.py or a plug-in's): `register_section` for
each configuration section it reads (beside the code that reads it, with what each
scale makes of it) and `models.register_model(KEY, sections=..., presets=..., ...)`
on its class, which fills a ModelSpec here. The configuration (config.py) reads every
model-specific fact from these tables: which sections a Config of a model holds, its
checks, its presets, their row names and table places, its one-line description.

Who fills the tables: importing maediff.models registers the built-in models and the
plug-ins. A lookup that misses runs the loader the package installs (`set_loader`,
from maediff/__init__.py: it imports maediff.models), so that `get_preset("cpu")`
works without importing the models first, and this module still names none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, is_dataclass
from typing import Any


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless `cond`: the configuration's checks, one message each."""
    if not cond:
        raise ValueError(msg)


# the sections every Config holds (config.py), in file order; not a model's to declare
SHARED_SECTIONS = ("geometry", "train", "data", "inference", "augment")
RESERVED_NAMES = (*SHARED_SECTIONS, "name", "model", "sections", "preset")
# a preset is a model's named configuration at a scale: NAME, NAME-cpu, NAME-tiny
# (config.py applies the scales)
SCALE_NAMES = ("paper", "cpu", "tiny")
ALIASES = {"paper": "maediff", "cpu": "maediff-cpu", "tiny": "maediff-tiny"}


@dataclass(frozen=True)
class Section:
    """A configuration section a model can hold: its type and what each scale makes of it."""

    name: str
    cls: type
    scales: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)  # "cpu", "tiny"


@dataclass(frozen=True)
class Preset:
    """A named configuration of a model (`NAME`, `NAME-cpu`, `NAME-tiny`): a row of a table.

    `delta` maps the model's default configuration (Config(model=KEY)) to this one;
    `table` is ("1" or "2", position), the row's place in the paper's tables; `same_as`
    names a preset of the other table with the same configuration (Table 2's U-Net is
    Table 1's pDDPM s16); `reference` marks the row the benchmark tests the others
    against."""

    name: str
    row: str
    delta: Callable[[Any], Any] | None = None
    table: tuple[str, int] | None = None
    same_as: str | None = None
    reference: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Everything the configuration knows of a model, from its `register_model`."""

    key: str
    sections: tuple[str, ...] = ()
    presets: tuple[Preset, ...] = ()
    # cross-section checks of this model: (cfg) -> None, raising ValueError
    check: Callable[[Any], None] | None = None
    # one line for logs and model cards: (cfg) -> str
    describe: Callable[[Any], str] | None = None
    # the step budget that gives each reconstructing part `updates` optimizer updates:
    # (cfg, updates) -> cfg; None: one part, steps = updates (docs/baselines.md §Budgets)
    update_budget: Callable[[Any, int], Any] | None = None
    # inference options beyond Alg. 2 the model implements: "guided_patches",
    # "noise_ensembles" (InferenceConfig), "iterative_sampling" (diffusion.sample_steps)
    options: tuple[str, ...] = ()


SECTIONS: dict[str, Section] = {}
SPECS: dict[str, ModelSpec] = {}
PRESETS: dict[str, tuple[str, Preset]] = {}  # preset name -> (model key, preset)
# plug-ins (entry points of `maediff.models`) that failed to load: entry point name ->
# one line naming the package, the error and how to remove it (models.load_plugins)
PLUGIN_FAILURES: dict[str, str] = {}

# --------------------------------------------------------------------------- the loader

_LOADER: list[Callable[[], None]] = []


def set_loader(load: Callable[[], None]) -> None:
    """Install the function that fills the tables (imports the models and plug-ins);
    lookups of a name not registered yet call it once more before they give up."""
    _LOADER[:] = [load]


def load_models() -> None:
    """Run the installed loader (nothing when none is installed)."""
    for load in _LOADER:
        load()


# --------------------------------------------------------------------------- declaring


def register_section(
    name: str, cls: type, *, cpu: Callable | None = None, tiny: Callable | None = None
) -> type:
    """Declare a configuration section `name` of type `cls` (a frozen dataclass) and
    what the `cpu` and `tiny` scales make of it ((section) -> section)."""
    if name in RESERVED_NAMES:
        raise ValueError(f"config section name {name!r} is reserved")
    old = SECTIONS.get(name)
    if old is not None and old.cls is not cls:
        raise ValueError(f"config section {name!r} is declared twice ({old.cls} and {cls})")
    if not is_dataclass(cls):
        raise TypeError(f"config section {name!r} must be a dataclass, got {cls!r}")
    scales = {k: v for k, v in (("cpu", cpu), ("tiny", tiny)) if v is not None}
    SECTIONS[name] = Section(name, cls, scales)
    return cls


def register_spec(spec: ModelSpec) -> None:
    """Add a model's spec and its presets (called by models.register_model)."""
    if spec.key in SPECS:
        raise ValueError(f"model {spec.key!r} is registered twice")
    missing = [s for s in spec.sections if s not in SECTIONS]
    if missing:
        raise ValueError(
            f"model {spec.key!r} names config section(s) {missing} that no register_section declares"
        )
    names = [p.name for p in spec.presets]
    if names and spec.key not in names:
        raise ValueError(
            f"model {spec.key!r} has no preset of its own name among {names}: the registry "
            f"key is also the name of the model's own row (docs/plugins.md)"
        )
    for p in spec.presets:
        check_new_preset(p.name, p.row)
    SPECS[spec.key] = spec
    for p in spec.presets:
        PRESETS[p.name] = (spec.key, p)


def check_new_preset(name: str, row: str) -> None:
    """A new preset's name follows the rules and neither it nor its row is taken."""
    ok = name and name == name.lower() and all(c.isalnum() or c == "-" for c in name)
    check(bool(ok), f"preset name {name!r} must be lower-case letters, digits and '-'")
    for scale in SCALE_NAMES:
        check(not name.endswith(f"-{scale}"), f"preset name {name!r} must not end in a scale name")
    if name in PRESETS or name in ALIASES:
        raise ValueError(f"a preset named {name!r} exists already")
    if not row or any(q.row == row for _, q in PRESETS.values()):
        raise ValueError(f"row name {row!r} of preset {name!r} is empty or taken")


def check_own_preset(key: str) -> None:
    """The naming rule: a registered model's key is also the name of one of its presets
    (its own row), given in register_model(presets=...) or by register_preset."""
    if PRESETS.get(key, (None,))[0] != key:
        raise ValueError(
            f"model {key!r} has no preset named {key!r}: declare Preset({key!r}, ROW) in its "
            f"register_model(presets=...) or call register_preset({key!r}, ...) (docs/plugins.md)"
        )


# --------------------------------------------------------------------------- looking up


def preset_name(model: str, scale: str = "paper") -> str:
    return model if scale == "paper" else f"{model}-{scale}"


def split_preset_name(name: str) -> tuple[str, str]:
    """'dae-cpu' -> ('dae', 'cpu'); aliases resolved ('cpu' -> ('maediff', 'cpu'))."""
    name = ALIASES.get(name, name)
    for scale in SCALE_NAMES:
        if scale != "paper" and name.endswith(f"-{scale}"):
            return name[: -len(scale) - 1], scale
    return name, "paper"


def plugin_note(name: str) -> str:
    """What the failed plug-ins have to do with an unknown model or preset `name`."""
    base = split_preset_name(name)[0]
    if base in PLUGIN_FAILURES:
        return f"; {PLUGIN_FAILURES[base]}"
    if PLUGIN_FAILURES:
        return f" (plug-ins that failed to load: {', '.join(sorted(PLUGIN_FAILURES))})"
    return ""


def model_spec(key: str) -> ModelSpec:
    if key not in SPECS:
        load_models()
    if key not in SPECS:
        raise ValueError(f"model={key!r} must be one of {tuple(SPECS)}{plugin_note(key)}")
    return SPECS[key]


def section_type(name: str) -> type:
    if name not in SECTIONS:
        load_models()
    if name not in SECTIONS:
        raise ValueError(f"unknown config section {name!r}")
    return SECTIONS[name].cls


def preset_info(name: str) -> Preset:
    """The declaration of preset `name` (a model name, without a scale)."""
    if name not in PRESETS:
        load_models()
    if name not in PRESETS:
        raise ValueError(
            f"unknown model {name!r}; choose one of {sorted(PRESETS)}{plugin_note(name)}"
        )
    return PRESETS[name][1]


def presets_of_table(table: str) -> tuple[str, ...]:
    """The preset names of the paper's Table `table` ("1" or "2"), in row order."""
    load_models()
    rows = [
        (p.table[1], name) for name, (_, p) in PRESETS.items() if p.table and p.table[0] == table
    ]
    return tuple(name for _, name in sorted(rows))


def model_names() -> tuple[str, ...]:
    """Every preset model name (without a scale): the rows of Table 1, then of Table 2,
    then the others (plug-ins) in registration order."""
    load_models()
    order = {n: (p.table or ("3", i)) for i, (n, (_, p)) in enumerate(PRESETS.items())}
    return tuple(sorted(PRESETS, key=lambda n: order[n]))


def models_with(option: str) -> tuple[str, ...]:
    """The registered models that declare inference option `option` (ModelSpec.options)."""
    load_models()
    return tuple(k for k, s in SPECS.items() if option in s.options)


__all__ = [
    "ALIASES",
    "PLUGIN_FAILURES",
    "PRESETS",
    "SCALE_NAMES",
    "SECTIONS",
    "SHARED_SECTIONS",
    "SPECS",
    "ModelSpec",
    "Preset",
    "Section",
    "check",
    "check_new_preset",
    "check_own_preset",
    "load_models",
    "model_names",
    "model_spec",
    "models_with",
    "plugin_note",
    "preset_info",
    "preset_name",
    "presets_of_table",
    "register_section",
    "register_spec",
    "set_loader",
    "split_preset_name",
]
