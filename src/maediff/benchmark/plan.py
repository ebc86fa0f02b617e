"""The benchmark's plan: which runs (model, fold, seed) it holds, each run's resolved
configuration, the shared training budget and the command that does one run.

    plan = BenchmarkPlan.from_args(table="1", scale="cpu", seeds=[0, 1, 2], minutes=3)
    [spec.key for spec in plan.runs()]   # "maediff/fold0-seed0", ...
    cfg = plan.config(plan.runs()[0])
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import Config, apply_overrides, get_preset
from ..models import MODELS
from ..registry import model_names, preset_info, preset_name, presets_of_table
from ..scales import with_update_budget


def row(model: str) -> str:
    """The table row of a preset model name (its declaration's `row`)."""
    return preset_info(model).row


def reference_of(table: str | None) -> str:
    """The row the paired tests compare against: the preset its model module marks as
    the reference of that table; for --models, the reference of Table 1 (MAEDiff)."""
    marked = [m for m in presets_of_table(table or "1") if preset_info(m).reference]
    return marked[0] if marked else Config().model


@dataclass(frozen=True)
class RunSpec:
    model: str  # preset base name, a row of Table 1 or 2
    fold: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}/fold{self.fold}-seed{self.seed}"


@dataclass
class BenchmarkPlan:
    models: list[str]
    scale: str = "cpu"
    folds: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0])
    data: str | None = None
    minutes: float | None = None
    steps: int | None = None
    max_volumes: int | None = None
    overrides: list[str] = field(default_factory=list)
    table: str | None = None

    @classmethod
    def from_args(
        cls,
        table: str | None = None,
        models: Sequence[str] | None = None,
        scale: str = "cpu",
        folds: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
        data: str | Path | None = None,
        minutes: float | None = None,
        steps: int | None = None,
        max_volumes: int | None = None,
        overrides: Sequence[str] = (),
    ) -> BenchmarkPlan:
        if bool(table) == bool(models):
            raise ValueError("give --table 1, --table 2 or --models NAME ..., one of them")
        names = list(presets_of_table(table) if table else models)
        known = model_names()
        unknown = [m for m in names if m not in known]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {list(known)}")
        if minutes is not None and steps is not None:
            raise ValueError("give one training budget: --minutes or --steps")
        if minutes is not None and not 0 < minutes < math.inf:
            raise ValueError(f"--minutes {minutes} must be a number of minutes > 0")
        if steps is not None and steps < 1:
            raise ValueError(f"--steps {steps} must be >= 1")
        if max_volumes is not None and max_volumes < 1:
            raise ValueError(f"--max-volumes {max_volumes} must be >= 1 (or left out for all)")
        for f in folds or []:
            if not 0 <= f <= 4:
                raise ValueError(f"fold {f} must be in 0..4")
        plan = cls(
            models=names,
            scale=scale,
            folds=list(folds or [0]),
            seeds=list(seeds or [0]),
            data=str(data) if data else None,
            minutes=minutes,
            steps=steps,
            max_volumes=max_volumes,
            overrides=list(overrides),
            table=table,
        )
        for spec in plan.runs():  # every configuration is valid before anything runs
            plan.config(spec)
        return plan

    def runs(self) -> list[RunSpec]:
        return [RunSpec(m, f, s) for m in self.models for f in self.folds for s in self.seeds]

    def config(self, spec: RunSpec) -> Config:
        """The preset at this scale, the budget shared by every model, the fold and seed."""
        cfg = get_preset(preset_name(spec.model, self.scale))
        t = cfg.train
        if self.minutes is not None:
            t = replace(t, max_minutes=self.minutes, max_steps=0, epochs=None)
        cfg = replace(cfg, train=t)
        if self.minutes is None and self.steps is not None:
            cfg = with_update_budget(cfg, self.steps)
        cfg = replace(
            cfg, train=replace(cfg.train, seed=spec.seed), data=replace(cfg.data, fold=spec.fold)
        )
        return apply_overrides(cfg, self.overrides) if self.overrides else cfg

    def budget(self) -> str:
        if self.minutes is not None:
            return f"{self.minutes:g} min of training per run"
        if self.steps is not None:
            return f"{self.steps} updates of each reconstructing part per run"
        return "each preset's own training budget"

    def reference(self) -> str | None:
        ref = reference_of(self.table)
        return ref if ref in self.models else None

    def command(self, out: Path, device: str, index: int | None = None) -> str:
        parts = ["maediff", "benchmark", "-o", str(out), "--scale", self.scale, "--device", device]
        parts += ["--table", self.table] if self.table else ["--models", *self.models]
        parts += ["--folds", *map(str, self.folds), "--seeds", *map(str, self.seeds)]
        for flag, v in (
            ("--data", self.data),
            ("--minutes", self.minutes),
            ("--steps", self.steps),
            ("--max-volumes", self.max_volumes),
        ):
            if v is not None:
                parts += [flag, str(v)]
        for o in self.overrides:
            parts += ["--set", o]
        if index is not None:
            parts += ["--run-index", str(index)]
        return shlex.join(parts)


def budget_of(cfg: Config) -> str:
    """The training budget of one configuration in the shared unit (updates per part)."""
    t = cfg.train
    if not MODELS[cfg.model].trainable:
        return "no training"
    if t.max_minutes:
        return f"{t.max_minutes:g} min"
    if not t.max_steps:
        return f"{t.epochs} epochs of batch {t.batch_size}"
    return MODELS[cfg.model].update_budget_text(cfg)


__all__ = ["BenchmarkPlan", "RunSpec", "budget_of", "reference_of", "row"]
