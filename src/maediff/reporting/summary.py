"""The summary of one evaluation (`summary.json`) as typed records.

    s = EvaluationSummary.read("runs/eval")          # the folder or its summary.json
    s.datasets["Brats21"].metrics["dice"].mean       # per-volume mean of a run
    s.datasets["Brats21"].threshold, s.healthy.metrics["l1"].mean
    write_json(s.to_json(), "summary.json")          # the file `maediff evaluate` writes

`to_json` gives the dict that `maediff evaluate` writes (the same keys in the same
order); `from_json` reads it back, also from older versions: what was added since
0.2.0 (results by lesion, the scoring options, `settings.lesion_overlap`, the
Dice-against-volume figure) reads as None and is left out again by `to_json`, so
`from_json(x).to_json() == x` for the summaries of every version. Keys it does not
know are ignored (a newer version's summary still reads). A file that is no summary
raises ValueError naming the file and what is wrong.

The keys of curves.npz ("LABEL DATASET|scores", "LABEL DATASET|labels") are built and
parsed here too (`curve_key`, `split_curve_key`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..evaluation.protocol import EvalSettings
from ..names import HEALTHY

SUMMARY_FILE = "summary.json"
CURVE_PARTS = ("scores", "labels")


# ------------------------------------------------------------------ reading helpers


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(v: Any, where: str) -> Mapping:
    if not isinstance(v, Mapping):
        raise ValueError(f"{where or 'the summary'} is not a JSON object (got {type(v).__name__})")
    return v


def _required(d: Mapping, key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"{where or 'the summary'} has no {key!r}")
    return d[key]


def _number(v: Any, where: str, optional: bool = True) -> float | None:
    """A JSON number (NaN and null read as None where a value may be missing)."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{where} is not a number (got {v!r})")
    if isinstance(v, float) and math.isnan(v):
        if optional:
            return None
        raise ValueError(f"{where} is not a number (NaN)")
    return v


def _text(v: Any, where: str) -> str | None:
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{where} is not a string (got {v!r})")
    return v


def _put(out: dict, key: str, value: Any) -> None:
    """Fields added after 0.2.0 (None: absent from the file) are left out."""
    if value is not None:
        out[key] = value


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class MetricStats:
    """Mean, sd (the sample sd, ddof 1; None for one volume) and count over the test
    volumes of one run."""

    mean: float
    std: float | None = None
    n: int | None = None

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> MetricStats:
        d = _mapping(d, where)
        return cls(
            _number(_required(d, "mean", where), _where(where, "mean"), optional=False),
            _number(d.get("std"), _where(where, "std")),
            _number(d.get("n"), _where(where, "n")),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": self.mean}
        _put(out, "std", self.std)
        _put(out, "n", self.n)
        return out


@dataclass(frozen=True)
class Exclusion:
    """Volumes left out of a metric's mean, and why (aggregate.exclusions)."""

    n: int
    reason: str

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> Exclusion:
        d = _mapping(d, where)
        return cls(
            _number(_required(d, "n", where), _where(where, "n"), optional=False),
            _text(d.get("reason", ""), _where(where, "reason")) or "",
        )

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "reason": self.reason}


@dataclass(frozen=True)
class LesionBand:
    """Lesions of one volume band: how many, how many detected."""

    band: str
    n: int
    detected: int
    sensitivity: float | None

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> LesionBand:
        d = _mapping(d, where)
        return cls(
            str(_required(d, "band", where)),
            _required(d, "n", where),
            _required(d, "detected", where),
            _number(d.get("sensitivity"), _where(where, "sensitivity")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "band": self.band,
            "n": self.n,
            "detected": self.detected,
            "sensitivity": self.sensitivity,
        }


@dataclass(frozen=True)
class LoadBand:
    """Test volumes whose total lesion volume falls in one band: count, mean Dice and AUPRC."""

    band: str
    n: int
    dice: float | None
    auprc: float | None

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> LoadBand:
        d = _mapping(d, where)
        return cls(
            str(_required(d, "band", where)),
            _required(d, "n", where),
            _number(d.get("dice"), _where(where, "dice")),
            _number(d.get("auprc"), _where(where, "auprc")),
        )

    def to_json(self) -> dict[str, Any]:
        return {"band": self.band, "n": self.n, "dice": self.dice, "auprc": self.auprc}


@dataclass(frozen=True)
class LesionResult:
    """Results by lesion of one data set (evaluation/lesions.py: lesion_summary); an
    undefined rate (no lesion, no volume) is None."""

    rule: str
    bands_ml: tuple[float | None, ...]
    lesions: int
    detected: int
    fp_components: int
    fp_per_volume: float | None
    lesion_f1: float | None
    sensitivity: float | None
    by_lesion_volume: tuple[LesionBand, ...] = ()
    by_volume_load: tuple[LoadBand, ...] = ()

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> LesionResult:
        d = _mapping(d, where)

        def bands(key: str, kind: type) -> tuple:
            items = d.get(key) or []
            if not isinstance(items, list):
                raise ValueError(f"{_where(where, key)} is not a list")
            return tuple(
                kind.from_json(b, f"{_where(where, key)}[{i}]") for i, b in enumerate(items)
            )

        return cls(
            rule=str(_required(d, "rule", where)),
            bands_ml=tuple(d.get("bands_ml") or ()),
            lesions=_required(d, "lesions", where),
            detected=_required(d, "detected", where),
            fp_components=_required(d, "fp_components", where),
            fp_per_volume=_number(d.get("fp_per_volume"), _where(where, "fp_per_volume")),
            lesion_f1=_number(d.get("lesion_f1"), _where(where, "lesion_f1")),
            sensitivity=_number(d.get("sensitivity"), _where(where, "sensitivity")),
            by_lesion_volume=bands("by_lesion_volume", LesionBand),
            by_volume_load=bands("by_volume_load", LoadBand),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "bands_ml": list(self.bands_ml),
            "lesions": self.lesions,
            "detected": self.detected,
            "fp_components": self.fp_components,
            "fp_per_volume": self.fp_per_volume,
            "lesion_f1": self.lesion_f1,
            "sensitivity": self.sensitivity,
            "by_lesion_volume": [b.to_json() for b in self.by_lesion_volume],
            "by_volume_load": [b.to_json() for b in self.by_volume_load],
        }


@dataclass(frozen=True)
class FixedFpr:
    """Dice and lesion-wise detection at a threshold set at a false-positive rate on the
    healthy validation volumes (evaluation/labelfree.py)."""

    fpr: float
    threshold: float
    dice: MetricStats | None
    lesion_f1: float | None
    sensitivity: float | None
    fp_per_volume: float | None

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> FixedFpr:
        d = _mapping(d, where)
        dice = d.get("dice")
        return cls(
            _number(_required(d, "fpr", where), _where(where, "fpr"), optional=False),
            _number(_required(d, "threshold", where), _where(where, "threshold"), optional=False),
            None if dice is None else MetricStats.from_json(dice, _where(where, "dice")),
            _number(d.get("lesion_f1"), _where(where, "lesion_f1")),
            _number(d.get("sensitivity"), _where(where, "sensitivity")),
            _number(d.get("fp_per_volume"), _where(where, "fp_per_volume")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "fpr": self.fpr,
            "threshold": self.threshold,
            "dice": None if self.dice is None else self.dice.to_json(),
            "lesion_f1": self.lesion_f1,
            "sensitivity": self.sensitivity,
            "fp_per_volume": self.fp_per_volume,
        }


@dataclass(frozen=True)
class LabelFreeResult:
    """What a user without lesion labels gets on one unhealthy data set (added after 0.5.0):
    the scan-level AUROC of the scan score against the healthy test volumes, and Dice /
    lesion F1 at thresholds set at false-positive rates on healthy validation volumes
    (`thresholds_source` names them)."""

    scan_auroc: float | None
    n_healthy: int
    n_unhealthy: int
    thresholds_source: str | None = None
    at_fpr: tuple[FixedFpr, ...] = ()

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> LabelFreeResult:
        d = _mapping(d, where)
        items = d.get("at_fpr") or []
        if not isinstance(items, list):
            raise ValueError(f"{_where(where, 'at_fpr')} is not a list")
        return cls(
            _number(d.get("scan_auroc"), _where(where, "scan_auroc")),
            _number(d.get("n_healthy", 0), _where(where, "n_healthy"), optional=False),
            _number(d.get("n_unhealthy", 0), _where(where, "n_unhealthy"), optional=False),
            _text(d.get("thresholds_source"), _where(where, "thresholds_source")),
            tuple(
                FixedFpr.from_json(a, f"{_where(where, 'at_fpr')}[{i}]")
                for i, a in enumerate(items)
            ),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "scan_auroc": self.scan_auroc,
            "n_healthy": self.n_healthy,
            "n_unhealthy": self.n_unhealthy,
            "thresholds_source": self.thresholds_source,
            "at_fpr": [a.to_json() for a in self.at_fpr],
        }


@dataclass
class DatasetResult:
    """One data set of an evaluation. An anomaly set has its threshold (chosen on its
    validation split), its source, results by lesion and seconds; the healthy test set
    (l1 only) has none of them (None)."""

    metrics: dict[str, MetricStats]
    n_test: int | None = None
    threshold: float | None = None
    threshold_source: str | None = None
    excluded: dict[str, Exclusion] | None = None
    lesions: LesionResult | None = None  # None: written before results by lesion existed
    seconds: float | None = None
    note: str | None = None
    label_free: LabelFreeResult | None = None  # None: an older summary, or no healthy scans

    @property
    def has_threshold(self) -> bool:
        return self.threshold is not None

    def mean(self, metric: str) -> float | None:
        """The per-volume mean of a metric, None where the run has no value."""
        m = self.metrics.get(metric)
        return None if m is None else m.mean

    @classmethod
    def from_json(cls, d: Any, where: str = "") -> DatasetResult:
        d = _mapping(d, where)
        w = _where(where, "metrics")
        metrics = {
            k: MetricStats.from_json(v, _where(w, k))
            for k, v in _mapping(_required(d, "metrics", where), w).items()
        }
        excluded = None
        if d.get("excluded") is not None:
            w = _where(where, "excluded")
            excluded = {
                k: Exclusion.from_json(v, _where(w, k))
                for k, v in _mapping(d["excluded"], w).items()
            }
        lesions = d.get("lesions")
        free = d.get("label_free")
        return cls(
            metrics=metrics,
            n_test=_number(d.get("n_test"), _where(where, "n_test")),
            threshold=_number(d.get("threshold"), _where(where, "threshold")),
            threshold_source=_text(d.get("threshold_source"), _where(where, "threshold_source")),
            excluded=excluded,
            lesions=None
            if lesions is None
            else LesionResult.from_json(lesions, _where(where, "lesions")),
            seconds=_number(d.get("seconds"), _where(where, "seconds")),
            note=_text(d.get("note"), _where(where, "note")),
            label_free=None
            if free is None
            else LabelFreeResult.from_json(free, _where(where, "label_free")),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _put(out, "threshold", self.threshold)
        _put(out, "threshold_source", self.threshold_source)
        _put(out, "n_test", self.n_test)
        out["metrics"] = {k: v.to_json() for k, v in self.metrics.items()}
        if self.excluded is not None:
            out["excluded"] = {k: v.to_json() for k, v in self.excluded.items()}
        if self.lesions is not None:
            out["lesions"] = self.lesions.to_json()
        _put(out, "seconds", self.seconds)
        _put(out, "note", self.note)
        if self.label_free is not None:
            out["label_free"] = self.label_free.to_json()
        return out


@dataclass
class Scoring:
    """Test-time options that change the anomaly maps (since 0.3; `workers` later)."""

    ensemble_t: list[int] = field(default_factory=list)
    ensemble_draws: int = 1
    standardise: str = "none"
    speed: list[str] = field(default_factory=list)
    workers: int | None = None
    t_test: int | None = None  # since 0.6: the diffusion models' test noise level
    t_choice: dict[str, Any] | None = None  # since 0.6: t_test chosen on validation
    normative: dict[str, Any] | None = None  # since 0.6: normative scoring's normaliser

    @classmethod
    def from_json(cls, d: Any, where: str = "scoring") -> Scoring:
        d = _mapping(d, where)
        return cls(
            list(d.get("ensemble_t") or []),
            d.get("ensemble_draws", 1),
            d.get("standardise", "none"),
            list(d.get("speed") or []),
            d.get("workers"),
            d.get("t_test"),
            d.get("t_choice"),
            d.get("normative"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ensemble_t": list(self.ensemble_t),
            "ensemble_draws": self.ensemble_draws,
            "standardise": self.standardise,
            "speed": list(self.speed),
        }
        _put(out, "workers", self.workers)
        _put(out, "t_test", self.t_test)
        _put(out, "t_choice", self.t_choice)
        _put(out, "normative", self.normative)
        return out


@dataclass
class Figures:
    """File names (in the evaluation folder) of the run's figures."""

    examples: list[str] = field(default_factory=list)
    pr_curves: str | None = None
    dice: str | None = None
    dice_vs_volume: str | None = None  # since 0.3

    @classmethod
    def from_json(cls, d: Any, where: str = "figures") -> Figures:
        d = _mapping(d, where)
        return cls(
            list(d.get("examples") or []),
            d.get("pr_curves"),
            d.get("dice"),
            d.get("dice_vs_volume"),
        )

    def names(self) -> list[str]:
        """Every figure, in the order the report shows them."""
        return [n for n in (*self.examples, self.pr_curves, self.dice, self.dice_vs_volume) if n]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"examples": list(self.examples)}
        _put(out, "pr_curves", self.pr_curves)
        _put(out, "dice", self.dice)
        _put(out, "dice_vs_volume", self.dice_vs_volume)
        return out


# the normaliser of normative scoring is recorded in `scoring.normative` instead
_SETTINGS = tuple(f.name for f in fields(EvalSettings) if f.name != "normaliser")


def settings_from_json(d: Any, where: str = "settings") -> tuple[EvalSettings, frozenset[str]]:
    """The protocol's settings of a summary, and the names the file lacks (a 0.2.0
    summary has no lesion_overlap: the default, which 0.2.0 did not use)."""
    d = _mapping(d, where)
    known = {k: d[k] for k in _SETTINGS if k in d}
    if "fprs" in known:
        known["fprs"] = tuple(known["fprs"])
    try:
        return EvalSettings(**known), frozenset(k for k in _SETTINGS if k not in d)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


@dataclass
class EvaluationSummary:
    """One run of the protocol (docs/evaluation.md §4): the model, where it came from,
    and per data set its threshold and metrics. `folder` is where the summary was read
    from (its figures and per-subject CSVs lie there); None for one held in memory."""

    model: str
    datasets: dict[str, DatasetResult]
    checkpoint: str | None = None
    config: str | None = None
    data_dir: str | None = None
    fold: int | None = None
    settings: EvalSettings | None = None
    scoring: Scoring | None = None
    seconds: float | None = None
    figures: Figures | None = None
    settings_absent: frozenset[str] = frozenset()  # settings the file did not hold
    folder: Path | None = field(default=None, compare=False)

    @property
    def anomaly(self) -> dict[str, DatasetResult]:
        """The data sets evaluated with a threshold (lesion labels), in file order."""
        return {ds: d for ds, d in self.datasets.items() if d.has_threshold}

    @property
    def healthy(self) -> DatasetResult | None:
        return self.datasets.get(HEALTHY)

    def mean(self, dataset: str, metric: str) -> float | None:
        """The per-volume mean of a metric on a data set; None where the run has none."""
        d = self.datasets.get(dataset)
        return None if d is None else d.mean(metric)

    @classmethod
    def from_json(
        cls, d: Any, source: str | Path | None = None, folder: Path | None = None
    ) -> EvaluationSummary:
        """The summary of a summary.json's dict; ValueError (naming `source`) when it
        is not one."""
        try:
            d = _mapping(d, "")
            model = _required(d, "model", "")
            if not isinstance(model, str):
                raise ValueError(f"'model' is not a string (got {model!r})")
            datasets = {
                str(ds): DatasetResult.from_json(v, f"datasets.{ds}")
                for ds, v in _mapping(_required(d, "datasets", ""), "datasets").items()
            }
            settings, absent = None, frozenset()
            if d.get("settings") is not None:
                settings, absent = settings_from_json(d["settings"])
            return cls(
                model=model,
                datasets=datasets,
                checkpoint=_text(d.get("checkpoint"), "checkpoint"),
                config=_text(d.get("config"), "config"),
                data_dir=_text(d.get("data_dir"), "data_dir"),
                fold=_number(d.get("fold"), "fold"),
                settings=settings,
                scoring=None if d.get("scoring") is None else Scoring.from_json(d["scoring"]),
                seconds=_number(d.get("seconds"), "seconds"),
                figures=None if d.get("figures") is None else Figures.from_json(d["figures"]),
                settings_absent=absent,
                folder=folder,
            )
        except ValueError as e:
            if source is None:
                raise
            raise ValueError(f"{source}: not an evaluation summary: {e}") from e

    @classmethod
    def read(cls, path: str | Path) -> EvaluationSummary:
        """summary.json of an evaluation (its folder or the file)."""
        p = Path(path)
        f = p / SUMMARY_FILE if p.is_dir() else p
        if not f.exists():
            raise ValueError(f"{p} holds no {SUMMARY_FILE} (run `maediff evaluate` first)")
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON: {e}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not a text file: {e}") from e
        return cls.from_json(data, source=f, folder=f.parent.resolve())

    def to_json(self) -> dict[str, Any]:
        """The dict of summary.json (NaN where a value is undefined: write_json writes null)."""
        out: dict[str, Any] = {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "config": self.config,
            "data_dir": self.data_dir,
            "fold": self.fold,
            "datasets": {ds: d.to_json() for ds, d in self.datasets.items()},
        }
        if self.settings is not None:
            out["settings"] = {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in self.settings.__dict__.items()
                if k in _SETTINGS and k not in self.settings_absent
            }
        if self.scoring is not None:
            out["scoring"] = self.scoring.to_json()
        _put(out, "seconds", self.seconds)
        if self.figures is not None:
            out["figures"] = self.figures.to_json()
        return out


def as_summary(s: EvaluationSummary | Mapping) -> EvaluationSummary:
    """A summary, from a summary.json dict where one is given (callers of 0.4)."""
    return s if isinstance(s, EvaluationSummary) else EvaluationSummary.from_json(s)


def as_summaries(items: Iterable[EvaluationSummary | Mapping]) -> list[EvaluationSummary]:
    return [as_summary(s) for s in items]


# ------------------------------------------------------------------ curves.npz keys


def curve_key(series: str, part: str) -> str:
    """The key of one array of curves.npz: series "LABEL DATASET", part scores or labels."""
    if part not in CURVE_PARTS:
        raise ValueError(f"curve part {part!r} is not one of {CURVE_PARTS}")
    return f"{series}|{part}"


def split_curve_key(key: str, datasets: Iterable[str]) -> tuple[str, str]:
    """(data set, part) of a curves.npz key. The label may hold spaces: the data set is
    the one of `datasets` the series ends with (the whole series when none does)."""
    series, sep, part = key.rpartition("|")
    if not sep or part not in CURVE_PARTS:
        raise ValueError(f"curves.npz key {key!r} is not 'LABEL DATASET|scores' or '|labels'")
    ds = next((d for d in datasets if series.endswith(f" {d}")), series)
    return ds, part


__all__ = [
    "SUMMARY_FILE",
    "DatasetResult",
    "EvaluationSummary",
    "Exclusion",
    "Figures",
    "FixedFpr",
    "LabelFreeResult",
    "LesionBand",
    "LesionResult",
    "LoadBand",
    "MetricStats",
    "Scoring",
    "as_summaries",
    "as_summary",
    "curve_key",
    "settings_from_json",
    "split_curve_key",
]
