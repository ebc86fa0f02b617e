"""Split + checkpoint -> metrics, per-subject CSVs, a JSON summary and the report.

    summary = evaluate_model(load_model("runs/cpu"), "DATA", "runs/cpu/eval")
    summary = evaluate_model(build_model(get_preset("thresh")), "DATA", "runs/thresh", label="Thresh")
    write_report([summary_a, summary_b], "report/")

Every model of the registry goes through the same code: its reconstruction of each
volume, then the same post-processing, threshold search and metrics. For Thresh the
reconstruction is zero, so the anomaly map is the image itself.

`evaluate_model` runs the protocol's steps: plan the splits, choose t_test and fit
normative scoring if asked (on validation volumes, each reconstructed once and then
reused: volumes.py), run the protocol on every data set (`run_protocol`, the pure
functions of maediff.evaluation on the reconstructed volumes), and hand what it
computed to reporting/results.py, which writes the files. EvalOptions holds how it
runs (the options of `maediff evaluate`).

Every split file of every data set is read (and every file it lists checked) before
the first volume is computed, and the output folder appears only when everything is
written: results go to a hidden sibling folder (.NAME.HOST-PID.partial) that is renamed
into place at the end and removed on failure; one that a killed evaluation left is
removed by the next. An output folder that already holds files is refused unless
`overwrite`; then summary.json, the mark of a finished evaluation, is replaced last. The summary is an EvaluationSummary (reporting/summary.py),
written as its `to_json()`. The report assembly lives in reporting/runs.py (no
torch).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ..config import DataConfig, display_name
from ..data.bids import is_bids, read_bids, split_every
from ..data.io import DataError
from ..data.splits import Subject, read_pddpm_split, split_csv_name
from ..evaluation.labelfree import fpr_thresholds
from ..evaluation.normative import BandNormaliser
from ..evaluation.numbers import run_numbers
from ..evaluation.protocol import (
    DatasetRun,
    EvalSettings,
    EvaluationRun,
    VolumeResult,
    evaluate_healthy,
    evaluate_split,
)
from ..names import HEALTHY
from ..outputs import (
    HOST,
    OutputError,
    check_outputs,
    clean_stale,
    owner_dead,
    partial_path,
    record_outputs,
)
from ..reporting.results import record_results, write_results
from ..reporting.runs import ANOMALY_SETS
from ..reporting.summary import SUMMARY_FILE, EvaluationSummary, Scoring
from .choose_t import TChoice, choose_t_test, with_t_test
from .volumes import Reconstructed, Reconstructions, t_test_of, volume_results
from .workers import ReconstructionPool, auto_workers, check_workers, remove_stale_copies

if TYPE_CHECKING:
    from ..models import AnomalyModel

__all__ = [
    "EvalOptions",
    "EvalPlan",
    "evaluate_model",
    "plan_bids_evaluation",
    "plan_evaluation",
    "run_protocol",
]


def drawn_lesions(data_dir: str | Path) -> dict[str, list[dict]]:
    """subject -> the lesions a generator recorded in DATA/lesions.csv (the synthetic
    benchmark writes it); {} when the file is absent."""
    f = Path(data_dir) / "lesions.csv"
    if not f.exists():
        return {}
    out: dict[str, list[dict]] = {}
    with f.open(newline="") as fh:
        for row in csv.DictReader(fh):
            rec: dict[str, Any] = dict(row)
            for key in ("x_mm", "y_mm", "z_mm", "volume_ml"):
                try:
                    rec[key] = float(rec[key])
                except (KeyError, ValueError) as e:
                    raise DataError(f"{f}: row {row} has no number in column {key!r}") from e
            out.setdefault(rec["subject"], []).append(rec)
    return out


def _limit(subjects: list[Subject], n: int | None) -> list[Subject]:
    return subjects[:n] if n else subjects


def check_counts(max_volumes: int | None, jobs: int, workers: int | None) -> None:
    """--max-volumes N >= 1 (None: all), --jobs >= 1, --workers >= 0 (None: automatic):
    0 or a negative count would silently mean all volumes or drop the last ones."""
    if max_volumes is not None and max_volumes < 1:
        raise ValueError(
            f"--max-volumes {max_volumes}: give a number of volumes >= 1 (or leave it out for all)"
        )
    if jobs < 1:
        raise ValueError(f"--jobs {jobs} must be >= 1")
    if workers is not None and workers < 0:
        raise ValueError(f"--workers {workers} must be >= 0 (0: in this process)")


@dataclass
class EvalPlan:
    """The subjects of every split an evaluation reads, all checked before any work."""

    anomaly: dict[str, tuple[list[Subject], list[Subject]]]  # data set -> (val, test)
    healthy_test: list[Subject] | None  # IXI test, or None when not evaluated
    # healthy validation volumes that set the thresholds at false-positive rates (IXI
    # val of the fold; BIDS: the healthy test volumes themselves), None: none
    healthy_val: list[Subject] | None = None
    healthy_val_source: str = ""

    @property
    def healthy_val_is_test(self) -> bool:
        return self.healthy_val is not None and self.healthy_val == self.healthy_test

    def subjects(self) -> list[Subject]:
        """Every subject in the order the evaluation reads them: the healthy validation
        volumes (their thresholds are needed before the test volumes are scored), per
        data set its validation then its test volumes, then the healthy test volumes
        (read first, once, when they are also the healthy validation volumes)."""
        order = [s for val, test in self.anomaly.values() for s in (*val, *test)]
        if self.healthy_val_is_test:
            return [*self.healthy_val, *order]
        return [*(self.healthy_val or []), *order, *(self.healthy_test or [])]


def plan_evaluation(
    data_dir: str | Path,
    datasets: Sequence[str] = ANOMALY_SETS,
    healthy_test: bool = True,
    max_volumes: int | None = None,
    fold: int = 0,
    healthy_val: bool = True,
) -> EvalPlan:
    """Read every split CSV up front (read_pddpm_split checks that the files it lists
    exist): a missing split, a missing avail_t2.csv or a missing scan fails here, in
    seconds, instead of after hours of reconstruction. The healthy validation split of
    `fold` (IXI_val_fold{fold}.csv) sets the false-positive-rate thresholds; without
    that file, or with healthy_val=False (a quicker evaluation: the demo), there are none."""
    anomaly = {}
    for ds in datasets:
        val = _limit(read_pddpm_split(data_dir, ds, "val"), max_volumes)
        test = _limit(read_pddpm_split(data_dir, ds, "test"), max_volumes)
        if not val:
            raise DataError(f"{ds}: the validation split is empty; the threshold search needs it")
        unlabelled = [s.name for s in val if s.seg is None]
        if unlabelled:
            raise DataError(
                f"{ds}: validation volume(s) without a segmentation: {', '.join(unlabelled[:5])}; "
                "the threshold search needs lesion labels"
            )
        anomaly[ds] = (val, test)
    ixi = _limit(read_pddpm_split(data_dir, HEALTHY, "test"), max_volumes) if healthy_test else None
    hv, source = None, ""
    if healthy_val and (Path(data_dir) / "splits" / split_csv_name(HEALTHY, "val", fold)).is_file():
        hv = _limit(read_pddpm_split(data_dir, HEALTHY, "val", fold), max_volumes) or None
        source = f"{HEALTHY} val fold {fold}"
    return EvalPlan(anomaly, ixi, hv, source)


def plan_bids_evaluation(
    root: str | Path,
    participants: dict[str, str] | None = None,
    val_fraction: float = 0.25,
    healthy_test: bool = True,
) -> EvalPlan:
    """The protocol on a BIDS data set (data/bids.py): its scans with lesion labels
    among `participants` form one data set, named after the data set's Name, whose
    every round(1 / val_fraction)-th subject (sorted by name) chooses the threshold and
    the rest are test volumes; its scans without lesion labels, if any, are the healthy
    test volumes (l1)."""
    root = Path(root)
    if not is_bids(root):
        raise DataError(f"{root} is not a BIDS data set (no dataset_description.json)")
    everyone = read_bids(root, participants)
    labelled = [s for s in everyone if s.seg is not None]
    if len(labelled) < 2:
        raise DataError(
            f"{root}: {len(labelled)} scan(s) with lesion labels; the protocol needs at least "
            "2 (validation for the threshold, and test)"
        )
    test, val = split_every(labelled, val_fraction)
    try:
        title = json.loads((root / "dataset_description.json").read_text()).get("Name", "")
    except json.JSONDecodeError as e:
        raise DataError(f"{root / 'dataset_description.json'} is not valid JSON: {e}") from e
    name = re.sub(r"[^A-Za-z0-9]+", "", str(title)) or "BIDS"
    healthy = [s for s in everyone if s.seg is None] if healthy_test else []
    # no separate healthy validation split: the healthy scans set the FPR thresholds and
    # give l1; neither enters a Dice of the protocol's threshold
    source = "the scans without lesion labels"
    return EvalPlan({name: (val, test)}, healthy or None, healthy or None, source)


def _publish(stage: Path, out: Path) -> None:
    """Move the finished results into `out`: one rename when it does not exist yet,
    else file by file (each an atomic replace), summary.json, the mark of a finished
    evaluation, last."""
    if not out.exists():
        stage.rename(out)
        return
    if not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    (out / SUMMARY_FILE).unlink(missing_ok=True)  # the old results are replaced: not finished
    for f in sorted(stage.iterdir(), key=lambda f: f.name == SUMMARY_FILE):
        os.replace(f, out / f.name)
    stage.rmdir()


def check_output(out: Path, overwrite: bool) -> None:
    """An output folder that holds files, even an earlier evaluation's, is replaced only
    with `overwrite` (the output rule, outputs.py: evaluate fills its folder whole)."""
    try:
        check_outputs(out, "evaluate", ["*"], overwrite, keep_own=True)
    except OutputError as e:  # evaluate_model's callers catch DataError
        raise DataError(str(e)) from e


def remove_leftovers(base: Path) -> None:
    """The staging folders that killed evaluations left beside `base` (outputs.py), and
    the weights copies of their workers."""
    clean_stale(base.parent)
    legacy = re.compile(rf"^\.{re.escape(base.name)}\.partial-(\d+)$")  # before HOST-PID names
    for p in base.parent.glob(f".{base.name}.partial-*"):
        m = legacy.match(p.name)
        if m and p.is_dir() and owner_dead(HOST, int(m[1])):
            shutil.rmtree(p, ignore_errors=True)
    remove_stale_copies()


SCORINGS = ("residual", "normative")


@dataclass(frozen=True)
class EvalOptions:
    """How `evaluate_model` runs: the options of `maediff evaluate`, with its defaults.

    datasets, healthy_test, fold, max_volumes: what plan_evaluation reads (a given
    plan replaces them). data_cfg: how volumes are loaded (None: the model's own).
    settings: the protocol's post-processing, search and metrics. n_jobs: processes that
    score volumes. workers: processes that reconstruct them, one thread each (None: one
    per torch thread, at most 4, for a trainable model on the CPU; 0: in this process).
    t_candidates: choose t_test among these on the validation volumes first
    (pipeline/choose_t.py); the evaluation then runs at the chosen t. scoring:
    "residual" (the paper: |x - x_rec|) or "normative" (evaluation/normative.py: against
    healthy residuals of the same intensity, fitted on the first NORMATIVE_VOLUMES
    healthy validation volumes of the fold). overwrite: replace the results in an output
    folder that holds files (else refused)."""

    label: str | None = None  # None: the model's row name in the registry (display_name)
    datasets: Sequence[str] = ANOMALY_SETS
    healthy_test: bool = True
    fold: int = 0
    data_cfg: DataConfig | None = None
    settings: EvalSettings = field(default_factory=EvalSettings)
    n_jobs: int = 2
    seed: int = 0
    max_volumes: int | None = None
    progress: bool = True
    figures: bool = True
    workers: int | None = None
    t_candidates: Sequence[int] = ()
    scoring: str = "residual"
    overwrite: bool = False

    def check(self) -> None:
        check_counts(max_volumes=self.max_volumes, jobs=self.n_jobs, workers=self.workers)
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring={self.scoring!r} must be 'residual' or 'normative'")


def evaluate_model(
    model: AnomalyModel,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    options: EvalOptions | None = None,
    plan: EvalPlan | None = None,
    **changes: Any,
) -> EvaluationSummary:
    """Run the protocol (docs/evaluation.md §1) on every data set and write the results;
    returns the typed summary, whose `to_json()` is OUT/summary.json (load_summary(OUT)
    reads it back).

    options: EvalOptions; `changes` are fields of it given by name
    (`evaluate_model(model, data, out, label="Thresh", figures=False)`).
    plan: the subjects to evaluate (a BIDS data set: plan_bids_evaluation); None reads
    pDDPM's split files of `data_dir`."""
    opts = replace(options or EvalOptions(), **changes)
    opts.check()
    if opts.label is None:
        opts = replace(opts, label=display_name(model.cfg))
    if plan is None:
        plan = plan_evaluation(
            data_dir, opts.datasets, opts.healthy_test, opts.max_volumes, opts.fold
        )
    out = Path(out_dir)
    check_output(out, opts.overwrite)
    data_cfg = opts.data_cfg or model.cfg.data
    volumes = Reconstructions(model, data_cfg, opts.seed)  # each volume once per t_test
    t_choice = choose_t(model, plan, data_cfg, opts, volumes)  # None without candidates
    settings = scoring_settings(model, data_dir, data_cfg, opts, volumes)
    workers = (
        opts.workers if opts.workers is not None else auto_workers(model, len(plan.subjects()))
    )
    check_workers(model, workers)
    summary = new_summary(model, data_dir, opts, data_cfg, settings, workers, t_choice)
    with staged_output(out) as stage, reconstruction_pool(model, workers) as pool:
        stream = volumes.stream(plan.subjects(), pool)
        run = run_protocol(plan, stream, settings, opts, drawn_lesions(data_dir))
        record_results(summary, run, run_numbers(run, settings))
        write_results(stage, summary, run, settings, figures=opts.figures)
    return summary


def choose_t(
    model: AnomalyModel,
    plan: EvalPlan,
    data_cfg: DataConfig,
    opts: EvalOptions,
    volumes: Reconstructions,
) -> TChoice | None:
    """t_test chosen among opts.t_candidates on the validation volumes (choose_t.py),
    and the model set to it; None without candidates. The chosen t's validation volumes
    stay in `volumes`."""
    if not opts.t_candidates:
        return None
    choice = choose_t_test(
        model, plan, data_cfg, opts.t_candidates, opts.seed, opts.settings, opts.progress, volumes
    )
    with_t_test(model, choice.chosen)
    return choice


def scoring_settings(
    model: AnomalyModel,
    data_dir: str | Path,
    data_cfg: DataConfig,
    opts: EvalOptions,
    volumes: Reconstructions,
) -> EvalSettings:
    """opts.settings, with normative scoring's normaliser fitted on the healthy
    validation volumes (kept in `volumes`) when opts.scoring asks for it."""
    if opts.scoring != "normative":
        return opts.settings
    norm = fit_normaliser(
        model, data_dir, opts.fold, data_cfg, opts.seed, opts.progress, volumes=volumes
    )
    return replace(opts.settings, normaliser=norm)


def reconstruction_pool(
    model: AnomalyModel, workers: int
) -> AbstractContextManager[ReconstructionPool | None]:
    """Worker processes that reconstruct (closed when the block ends); none: None."""
    return ReconstructionPool(model, workers) if workers else nullcontext()


def new_summary(
    model: AnomalyModel,
    data_dir: str | Path,
    opts: EvalOptions,
    data_cfg: DataConfig,
    settings: EvalSettings,
    workers: int,
    t_choice: TChoice | None = None,
) -> EvaluationSummary:
    """The summary before any data set: what was evaluated, on what, and how."""
    info = model.checkpoint_info
    return EvaluationSummary(
        model=opts.label,
        checkpoint=info.get("path"),
        config=model.cfg.name,
        data_dir=str(Path(data_dir).resolve()),
        fold=opts.fold,
        datasets={},
        settings=settings,
        scoring=Scoring(  # test-time options that change the maps
            ensemble_t=list(model.cfg.inference.ensemble_t),
            ensemble_draws=model.cfg.inference.ensemble_draws,
            standardise=data_cfg.standardise,
            speed=list(info.get("speed", [])),
            workers=workers,
            t_test=t_test_of(model),
            t_choice=t_choice.to_json() if t_choice else None,
            normative=settings.normaliser.to_json() if settings.normaliser else None,
        ),
    )


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A hidden sibling of `out` (.NAME.HOST-PID.partial) to write into, moved into
    place when the block ends and removed when it fails; leftovers of killed
    evaluations are removed first."""
    base = out.resolve()
    base.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(base)
    stage = partial_path(base)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        # the record of what evaluate wrote (outputs.py) travels with the results
        files = [p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()]
        record_outputs(stage, "evaluate", files)
        _publish(stage, base)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def run_protocol(
    plan: EvalPlan,
    stream: Iterator[Reconstructed],
    settings: EvalSettings,
    opts: EvalOptions,
    drawn: dict[str, list[dict]] | None = None,
) -> EvaluationRun:
    """The protocol on the reconstructed volumes of `stream` (in plan.subjects() order):
    thresholds at false-positive rates on the healthy validation volumes, then per data
    set the threshold search on its validation volumes and the metrics of its test
    volumes, then the healthy test volumes."""
    start = time.perf_counter()
    thresholds, healthy = _healthy_validation(plan, stream, settings, opts)
    run = EvaluationRun(
        datasets={},
        fpr_thresholds=thresholds,
        fpr_source=f"{plan.healthy_val_source} ({len(plan.healthy_val or [])} healthy volumes)",
        healthy=None,
    )
    for ds, (val, test) in plan.anomaly.items():
        run.datasets[ds] = _run_dataset(ds, val, test, stream, settings, opts, thresholds, drawn)
    if plan.healthy_test is not None:
        run.healthy = (
            healthy if healthy is not None else _healthy_test(plan, stream, settings, opts)
        )
    run.seconds = round(time.perf_counter() - start, 1)
    return run


def _bar(total: int, desc: str, opts: EvalOptions) -> tqdm:
    return tqdm(total=total, desc=f"{opts.label} {desc}", unit="vol", disable=not opts.progress)


def _run_dataset(
    ds: str,
    val: list[Subject],
    test: list[Subject],
    stream: Iterator[Reconstructed],
    settings: EvalSettings,
    opts: EvalOptions,
    thresholds: dict[str, float] | None,
    drawn: dict[str, list[dict]] | None,
) -> DatasetRun:
    """One data set: threshold on its validation volumes, metrics of its test volumes
    (the first three kept for the example figure)."""
    bar = _bar(len(val) + len(test), ds, opts)
    kept: list[VolumeResult] = []
    t0 = time.perf_counter()
    outcome = evaluate_split(
        volume_results(val, stream, bar),
        volume_results(test, stream, bar, kept, 3, drawn),
        settings,
        n_jobs=opts.n_jobs,
        fpr_thresholds=thresholds,
    )
    bar.close()
    return DatasetRun(len(val), len(test), outcome, kept, round(time.perf_counter() - t0, 1))


def _healthy_validation(
    plan: EvalPlan, stream: Iterator[Reconstructed], settings: EvalSettings, opts: EvalOptions
) -> tuple[dict[str, float] | None, list[dict] | None]:
    """Thresholds at settings.fprs on the healthy validation volumes (None without
    them), and their records when they are also the healthy test volumes (BIDS)."""
    if not plan.healthy_val:
        return None, None
    bar = _bar(len(plan.healthy_val), "healthy val", opts)
    pool: list[np.ndarray] = []
    records = evaluate_healthy(volume_results(plan.healthy_val, stream, bar), settings, pool)
    bar.close()
    thresholds = fpr_thresholds(pool, settings.fprs)
    return thresholds, records if plan.healthy_val_is_test else None


def _healthy_test(
    plan: EvalPlan, stream: Iterator[Reconstructed], settings: EvalSettings, opts: EvalOptions
) -> list[dict]:
    """Step 8 (l1) and the scan scores of the healthy test volumes."""
    subjects = plan.healthy_test or []
    bar = _bar(len(subjects), "IXI test", opts)
    records = evaluate_healthy(volume_results(subjects, stream, bar), settings)
    bar.close()
    return records


NORMATIVE_VOLUMES = 8  # healthy validation volumes that fit normative scoring


def fit_normaliser(
    model: AnomalyModel,
    data_dir: str | Path,
    fold: int,
    data_cfg: DataConfig,
    seed: int,
    progress: bool = True,
    n: int = NORMATIVE_VOLUMES,
    volumes: Reconstructions | None = None,
) -> BandNormaliser:
    """Normative scoring's per-band healthy residual statistics, from the first `n`
    healthy validation volumes (IXI val of `fold`) reconstructed as the protocol does.
    Never from test volumes. `volumes` (of this model, data_cfg and seed) keeps their
    reconstructions for the evaluation, which reads them again."""
    subjects = read_pddpm_split(data_dir, HEALTHY, "val", fold)[:n]
    if not subjects:
        raise DataError(
            f"{data_dir}: no healthy validation volumes (IXI val) to fit normative scoring"
        )
    volumes = volumes if volumes is not None else Reconstructions(model, data_cfg, seed)
    healthy = []
    for s in tqdm(subjects, desc="normative scoring", unit="vol", disable=not progress):
        _, image, brain, _, rec, _ = volumes.get(s, keep=True)
        healthy.append((image, rec, brain))
    return BandNormaliser.fit(healthy, names=[s.name for s in subjects])
