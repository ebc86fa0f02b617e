"""Split + checkpoint -> metrics, per-subject CSVs, a JSON summary and the report.

    summary = evaluate_model(load_model("runs/cpu"), "DATA", "runs/cpu/eval")
    summary = evaluate_model(build_model(get_preset("thresh")), "DATA", "runs/thresh", label="Thresh")
    write_report([summary_a, summary_b], "report/")

Every model of the registry goes through the same code: its reconstruction of each
volume, then the same post-processing, threshold search and metrics. For Thresh the
reconstruction is zero, so the anomaly map is the image itself.

Every split file of every data set is read (and every file it lists checked) before
the first volume is computed, and the output folder appears only when everything is
written: results go to a hidden sibling folder (.NAME.HOST-PID.partial) that is renamed
into place at the end and removed on failure; one that a killed evaluation left is
removed by the next. An output folder that already holds files is refused unless
`overwrite`; then summary.json, the mark of a finished evaluation, is replaced last. The summary is an EvaluationSummary (evaluation/summary.py),
written as its `to_json()`. The report assembly lives in evaluation/runs.py (no
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ..config import DataConfig
from ..data.bids import is_bids, read_bids, split_every
from ..data.io import DataError
from ..data.splits import Subject, read_pddpm_split, split_csv_name
from ..evaluation.aggregate import METRICS, exclusions, summarise, write_json, write_subject_csv
from ..evaluation.labelfree import fixed_fpr_summary, fpr_thresholds, scan_auroc
from ..evaluation.lesions import lesion_summary
from ..evaluation.normative import BandNormaliser
from ..evaluation.protocol import EvalSettings, VolumeResult, evaluate_healthy, evaluate_split
from ..evaluation.report import figure_dice_distribution, figure_dice_vs_volume, figure_pr_curves
from ..evaluation.runs import ANOMALY_SETS, example_figure, write_report
from ..evaluation.summary import (
    SUMMARY_FILE,
    DatasetResult,
    EvaluationSummary,
    Exclusion,
    Figures,
    FixedFpr,
    LabelFreeResult,
    LesionResult,
    MetricStats,
    Scoring,
    curve_key,
)
from ..names import HEALTHY
from ..outputs import HOST, clean_stale, owner_dead, partial_path
from .choose_t import choose_t_test, with_t_test
from .detect import reconstruct_subject
from .workers import ReconstructionPool, auto_workers, check_workers, remove_stale_copies

if TYPE_CHECKING:
    from ..models import AnomalyModel

__all__ = [
    "EvalPlan",
    "evaluate_model",
    "plan_bids_evaluation",
    "plan_evaluation",
]


def _volumes(
    subjects: Sequence[Subject],
    model: AnomalyModel,
    data_cfg: DataConfig,
    seed: int,
    keep: list | None,
    n_keep: int,
    bar: tqdm | None,
    stream: Iterator[tuple] | None = None,
    drawn: dict[str, list[dict]] | None = None,
) -> Iterator[VolumeResult]:
    """Load, reconstruct and yield volumes one at a time (keeping the first n_keep), in
    this process or, with `stream`, from worker processes that compute the same
    (ReconstructionPool.map over every subject of the evaluation, in reading order).

    Under the protocol every patch is reconstructed (skip_empty_patches=False): the
    whole-volume l1 sees the model's output outside the brain too, as the reference."""
    if stream is not None:
        results = (_next_of(stream, s.name) for s in subjects)
    else:
        results = (reconstruct_subject(model, s, data_cfg, seed) for s in subjects)
    for name, image, brain, seg, rec, affine in results:
        v = VolumeResult(name, image, rec, brain, seg, affine, (drawn or {}).get(name, []))
        if keep is not None and len(keep) < n_keep:
            keep.append(v)
        if bar is not None:
            bar.update()
        yield v


def _next_of(stream: Iterator[tuple], name: str) -> tuple:
    item = next(stream)
    if item[0] != name:  # the protocol reads the volumes in the order they were queued
        raise RuntimeError(f"worker stream out of order: expected {name}, got {item[0]}")
    return item


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
    """An output folder that holds files is replaced only with `overwrite`."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    held = (
        sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    )
    if held and not overwrite:
        raise DataError(
            f"output {out} already holds {len(held)} file(s) ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}); pass --overwrite to replace its results, "
            "or choose another folder"
        )


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


def evaluate_model(
    model: AnomalyModel,
    data_dir: str | Path,
    out_dir: str | Path,
    label: str = "MAEDiff",
    datasets: Sequence[str] = ANOMALY_SETS,
    healthy_test: bool = True,
    fold: int = 0,
    data_cfg: DataConfig | None = None,
    settings: EvalSettings = EvalSettings(),
    n_jobs: int = 2,
    seed: int = 0,
    max_volumes: int | None = None,
    progress: bool = True,
    figures: bool = True,
    workers: int | None = None,
    plan: EvalPlan | None = None,
    t_candidates: Sequence[int] = (),
    scoring: str = "residual",
    overwrite: bool = False,
) -> EvaluationSummary:
    """Run the protocol (docs/evaluation.md §1) on every data set and write the results;
    returns the typed summary, whose `to_json()` is OUT/summary.json (load_summary(OUT)
    reads it back).

    workers: processes that reconstruct the volumes, one thread each (None: one per
    torch thread, at most 4, for a trainable model on the CPU; 0: in this process).
    plan: the subjects to evaluate (a BIDS data set: plan_bids_evaluation); None reads
    pDDPM's split files of `data_dir`.
    t_candidates: choose t_test among these on the validation volumes first
    (pipeline/choose_t.py); the evaluation then runs at the chosen t.
    scoring: "residual" (the paper: |x - x_rec|) or "normative" (evaluation/normative.py:
    against healthy residuals of the same intensity, fitted on the first
    NORMATIVE_VOLUMES healthy validation volumes of the fold).
    overwrite: replace the results in an output folder that holds files (else refused)."""
    check_counts(max_volumes=max_volumes, jobs=n_jobs, workers=workers)
    if plan is None:
        plan = plan_evaluation(data_dir, datasets, healthy_test, max_volumes, fold)
    out = Path(out_dir)
    check_output(out, overwrite)
    data_cfg = data_cfg or model.cfg.data
    info = getattr(model, "checkpoint_info", {})
    t_choice = None
    if t_candidates:
        t_choice = choose_t_test(model, plan, data_cfg, t_candidates, seed, settings, progress)
        with_t_test(model, t_choice.chosen)
    if scoring not in ("residual", "normative"):
        raise ValueError(f"scoring={scoring!r} must be 'residual' or 'normative'")
    if scoring == "normative":
        norm = fit_normaliser(model, data_dir, fold, data_cfg, seed, progress)
        settings = replace(settings, normaliser=norm)
    if workers is None:
        workers = auto_workers(model, len(plan.subjects()))
    check_workers(model, workers)
    summary = EvaluationSummary(
        model=label,
        checkpoint=info.get("path"),
        config=model.cfg.name,
        data_dir=str(Path(data_dir).resolve()),
        fold=fold,
        datasets={},
        settings=settings,
        scoring=Scoring(  # test-time options that change the maps (duck-typed models lack them)
            ensemble_t=list(getattr(model.cfg.inference, "ensemble_t", ())),
            ensemble_draws=getattr(model.cfg.inference, "ensemble_draws", 1),
            standardise=getattr(data_cfg, "standardise", "none"),
            speed=list(info.get("speed", [])),
            workers=workers,
            t_test=_t_test(model),
            t_choice=t_choice.to_json() if t_choice else None,
            normative=settings.normaliser.to_json() if settings.normaliser else None,
        ),
    )
    base = out.resolve()
    base.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(base)
    stage = partial_path(base)  # .NAME.HOST-PID.partial, renamed into place when complete
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    pool = ReconstructionPool(model, workers) if workers else None
    try:
        _run(
            model,
            plan,
            stage,
            summary,
            data_cfg,
            settings,
            label,
            fold,
            n_jobs,
            seed,
            progress,
            figures,
            pool,
            drawn_lesions(data_dir),
        )
        write_json(summary.to_json(), stage / SUMMARY_FILE)
        write_report([summary], stage)
        _publish(stage, base)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.close()
    return summary


def _run(
    model: AnomalyModel,
    plan: EvalPlan,
    out: Path,
    summary: EvaluationSummary,
    data_cfg: DataConfig,
    settings: EvalSettings,
    label: str,
    fold: int,
    n_jobs: int,
    seed: int,
    progress: bool,
    figures: bool,
    pool: ReconstructionPool | None = None,
    drawn: dict[str, list[dict]] | None = None,
) -> None:
    """Every data set, then the healthy test set; results and figures into `out`."""
    curves, dice_dists, examples_png, by_volume = {}, {}, [], {}
    stream = None
    if pool is not None:  # one queue over everything, so that no worker waits between splits
        stream = pool.map(plan.subjects(), data_cfg, seed)
    start = time.perf_counter()
    thresholds, healthy_records = _healthy_validation(
        plan, model, data_cfg, settings, label, seed, progress, stream
    )
    scan_scores: dict[str, list[float]] = {}
    for ds, (val, test) in plan.anomaly.items():
        bar = tqdm(
            total=len(val) + len(test), desc=f"{label} {ds}", unit="vol", disable=not progress
        )
        kept: list[VolumeResult] = []
        t0 = time.perf_counter()
        outcome = evaluate_split(
            _volumes(val, model, data_cfg, seed, None, 0, bar, stream),
            _volumes(test, model, data_cfg, seed, kept, 3, bar, stream, drawn),
            settings,
            n_jobs=n_jobs,
            fpr_thresholds=thresholds,
        )
        bar.close()
        scan_scores[ds] = [r.get("anomaly_score", float("nan")) for r in outcome.records]
        context = {
            "model": label,
            "dataset": ds,
            "split": "test",
            "fold": fold,
            "threshold": outcome.threshold,
        }
        write_subject_csv(outcome.records, out / f"{ds}_test_subjects.csv", context)
        write_subject_csv(outcome.lesions, out / f"{ds}_test_lesions.csv", context)
        summary.datasets[ds] = DatasetResult(
            threshold=outcome.threshold,
            threshold_source=f"{ds} val ({len(val)} volumes, pooled Dice {outcome.val_dice:.4f})",
            n_test=len(test),
            metrics=_metrics(outcome.records),
            excluded=_excluded(outcome.records),
            lesions=LesionResult.from_json(
                lesion_summary(outcome.records, outcome.lesions, overlap=settings.lesion_overlap)
            ),
            seconds=round(time.perf_counter() - t0, 1),
            note="oracle_best_dice chooses the threshold on each test volume itself: an upper bound, not a result",
            label_free=label_free_result(
                outcome.records,
                thresholds,
                settings,
                f"{plan.healthy_val_source} ({len(plan.healthy_val or [])} healthy volumes)",
            ),
        )
        curves[f"{label} {ds}"] = (outcome.curve_scores, outcome.curve_labels)
        dice_dists[f"{label} {ds}"] = [r.get("dice", float("nan")) for r in outcome.records]
        by_volume[ds] = [
            (r["lesion_ml"], r.get("dice", float("nan")))
            for r in outcome.records
            if "lesion_ml" in r
        ]
        if figures and kept:
            examples_png.append(
                example_figure(kept, outcome.threshold, settings, out / f"examples_{ds}.png")
            )
    if plan.healthy_test is not None:
        subjects = plan.healthy_test
        records = healthy_records
        if records is None:
            bar = tqdm(
                total=len(subjects), desc=f"{label} IXI test", unit="vol", disable=not progress
            )
            vols = _volumes(subjects, model, data_cfg, seed, None, 0, bar, stream)
            records = evaluate_healthy(vols, settings)
            bar.close()
        add_scan_auroc(summary, scan_scores, [r["anomaly_score"] for r in records])
        write_subject_csv(
            records,
            out / "IXI_test_subjects.csv",
            {"model": label, "dataset": HEALTHY, "split": "test", "fold": fold},
        )
        summary.datasets[HEALTHY] = DatasetResult(
            n_test=len(subjects),
            metrics=_metrics(records, ("l1",)),
            excluded=_excluded(records, ("l1",)),
        )
    summary.seconds = round(time.perf_counter() - start, 1)
    if figures and curves:
        summary.figures = Figures(
            examples=[p.name for p in examples_png],
            pr_curves=figure_pr_curves(curves, out / "pr_curves.png").name,
            dice=figure_dice_distribution(dice_dists, out / "dice_per_subject.png").name,
            dice_vs_volume=figure_dice_vs_volume(by_volume, label, out / "dice_vs_volume.png").name,
        )
        np.savez_compressed(
            out / "curves.npz",
            **{curve_key(k, "scores"): v[0] for k, v in curves.items()},
            **{curve_key(k, "labels"): v[1] for k, v in curves.items()},
        )


def _healthy_validation(
    plan: EvalPlan,
    model: AnomalyModel,
    data_cfg: DataConfig,
    settings: EvalSettings,
    label: str,
    seed: int,
    progress: bool,
    stream: Iterator[tuple] | None,
) -> tuple[dict[str, float] | None, list[dict] | None]:
    """Thresholds at settings.fprs on the healthy validation volumes (None without
    them), and their records when they are also the healthy test volumes (BIDS)."""
    if not plan.healthy_val:
        return None, None
    subjects = plan.healthy_val
    bar = tqdm(total=len(subjects), desc=f"{label} healthy val", unit="vol", disable=not progress)
    pool: list[np.ndarray] = []
    vols = _volumes(subjects, model, data_cfg, seed, None, 0, bar, stream)
    records = evaluate_healthy(vols, settings, pool)
    bar.close()
    thresholds = fpr_thresholds(pool, settings.fprs)
    return thresholds, records if plan.healthy_val_is_test else None


def label_free_result(
    records: Sequence[dict],
    thresholds: dict[str, float] | None,
    settings: EvalSettings,
    source: str | None,
) -> LabelFreeResult:
    """Dice and lesion F1 at the FPR thresholds of one data set (the scan-level AUROC
    is added once the healthy test volumes are scored: add_scan_auroc)."""
    at = fixed_fpr_summary(records, thresholds, settings.fprs) if thresholds else []
    return LabelFreeResult(
        scan_auroc=None,
        n_healthy=0,
        n_unhealthy=len(records),
        thresholds_source=source if thresholds else None,
        at_fpr=tuple(FixedFpr.from_json(a) for a in at),
    )


def add_scan_auroc(
    summary: EvaluationSummary, scan_scores: dict[str, list[float]], healthy: list[float]
) -> None:
    """Scan-level AUROC of each unhealthy test set against the healthy test volumes."""
    for ds, unhealthy in scan_scores.items():
        d = summary.datasets[ds]
        if d.label_free is not None:
            d.label_free = replace(
                d.label_free, scan_auroc=scan_auroc(healthy, unhealthy), n_healthy=len(healthy)
            )


NORMATIVE_VOLUMES = 8  # healthy validation volumes that fit normative scoring


def fit_normaliser(
    model: AnomalyModel,
    data_dir: str | Path,
    fold: int,
    data_cfg: DataConfig,
    seed: int,
    progress: bool = True,
    volumes: int = NORMATIVE_VOLUMES,
) -> BandNormaliser:
    """Normative scoring's per-band healthy residual statistics, from the first `volumes`
    healthy validation volumes (IXI val of `fold`) reconstructed as the protocol does.
    Never from test volumes."""
    subjects = read_pddpm_split(data_dir, HEALTHY, "val", fold)[:volumes]
    if not subjects:
        raise DataError(
            f"{data_dir}: no healthy validation volumes (IXI val) to fit normative scoring"
        )
    healthy = []
    for s in tqdm(subjects, desc="normative scoring", unit="vol", disable=not progress):
        _, image, brain, _, rec, _ = reconstruct_subject(model, s, data_cfg, seed)
        healthy.append((image, rec, brain))
    return BandNormaliser.fit(healthy, names=[s.name for s in subjects])


def _t_test(model: AnomalyModel) -> int | None:
    """The diffusion models' test noise level; None for others (and duck-typed models)."""
    section = getattr(model.cfg, "section", None)
    return getattr(section("diffusion"), "t_test", None) if callable(section) else None


def _metrics(records: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict[str, MetricStats]:
    return {k: MetricStats(**v) for k, v in summarise(records, metrics).items()}


def _excluded(records: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict[str, Exclusion]:
    return {k: Exclusion(**v) for k, v in exclusions(records, metrics).items()}
