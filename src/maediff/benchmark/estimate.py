"""How long each job of `maediff benchmark` will take, measured on this machine
(`benchmark --list`).

    jobs = estimate_jobs(plan, out, device="cpu")     # measures what it must, once
    print("\n".join(summary_lines(jobs, "cpu", measure=True)), job_line(jobs[0]))

A job is one run (model, fold, seed): training, then the evaluation. Its time is
taken, in this order of preference, from

- its own folder, when the run has finished (timing.json: "done");
- a finished run of the same configuration (another fold or seed) in OUT: its
  recorded training and evaluation times, the evaluation scaled to the run's volumes
  ("recorded");
- a calibration on this machine ("measured"): the training loop's own step timed on
  random volumes of the run's batch size (`time_training_steps`: 1 warm-up step, then
  3 timed) times the run's steps, and its validation passes (`validation_loss` timed
  on random volumes, per validation volume); the reconstruction of random slices (on
  a GPU one inference batch after a warm-up slice; on a CPU, whose time grows with
  the slices, one slice) scaled to every slice of every volume the run reconstructs
  (the protocol's and Figure 3's); and, once the data exist, the protocol's own time
  (`measure_protocol`: Thresh evaluated, per run and per volume).

The calibrations are cached in OUT/estimates.json, keyed by the configuration (less
its seed and fold), the device, the number of threads and the version, so a second
`--list` measures nothing. A measured estimate leaves out loading the training data,
checkpoints and the patch probe; a recorded one holds everything the run did, on
whatever machine ran it. A budget in minutes (`--minutes`) is its own estimate of the
training time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..config import Config, to_dict
from ..data.splits import read_pddpm_split, split_csv_name
from ..device import resolve_device
from ..models import MODELS, build_model
from ..names import FIGURE_SUBJECTS, HEALTHY
from ..reporting.files import write_atomic
from .plan import BenchmarkPlan, RunSpec
from .status import is_done, twin_run

ESTIMATES_FILE = "estimates.json"
TIMED_STEPS, WARMUP_STEPS = 3, 1
CPU_SLICES = 1  # slices reconstructed to time a CPU (a GPU: one inference batch, after one)


@dataclass
class JobEstimate:
    """One job's work and time; seconds None where nothing is known."""

    steps: int | None  # training steps (None: a budget in minutes, or no training)
    volumes: int  # volumes reconstructed by the evaluation and for Figure 3
    train_s: float | None
    evaluate_s: float | None
    source: str  # "done", "recorded", "measured", "not measured"
    served_by: str = ""  # done as this twin row's run (benchmark `twin_run`)

    @property
    def total_s(self) -> float | None:
        if self.train_s is None or self.evaluate_s is None:
            return None
        return self.train_s + self.evaluate_s

    @property
    def left_s(self) -> float | None:
        """The time still to spend: 0 for a finished run."""
        return 0.0 if self.source == "done" else self.total_s


# ------------------------------------------------------------------ what a job does


@dataclass(frozen=True)
class DataCounts:
    """What the estimate needs of the data: the training volumes of a fold, the
    volumes a run's evaluation reconstructs, and Figure 3's."""

    train_volumes: int
    val_volumes: int  # the training's validation volumes (IXI val of the fold)
    eval_volumes: int
    figure_volumes: int


def data_counts(plan: BenchmarkPlan, out: Path, fold: int) -> DataCounts:
    """From --data, or OUT/data when it holds the synthetic benchmark; else from the
    synthetic benchmark that the first run will generate there."""
    from ..pipeline.evaluate import plan_evaluation

    data = data_folder(plan, out)
    if data is not None:
        subjects = plan_evaluation(data, fold=fold, max_volumes=plan.max_volumes).subjects()
        train = read_pddpm_split(data, HEALTHY, "train", fold=fold)
        has_val = (data / "splits" / split_csv_name(HEALTHY, "val", fold)).is_file()
        val = read_pddpm_split(data, HEALTHY, "val", fold=fold) if has_val else []
        figure = sum(len(read_pddpm_split(data, ds, "test")[:n]) for ds, n in FIGURE_SUBJECTS)
        return DataCounts(len(train), len(val), len(subjects), figure)
    return synthetic_counts(plan.max_volumes, fold)


def synthetic_counts(max_volumes: int | None, fold: int) -> DataCounts:
    """The counts of the synthetic benchmark `ensure_data` generates (SynthConfig():
    the healthy pool in 5 folds, data/synthetic.py `write_splits`)."""
    from ..data.synthetic import SynthConfig

    c = SynthConfig()
    val = len(np.array_split(np.arange(c.healthy_trainval), 5)[fold])

    def cap(n: int) -> int:
        return min(n, max_volumes) if max_volumes else n

    evals = cap(val) + cap(c.tumour_val) + cap(c.tumour_test)
    evals += cap(c.ms_val) + cap(c.ms_test) + cap(c.healthy_test)
    figure = sum(n for _, n in FIGURE_SUBJECTS)
    return DataCounts(c.healthy_trainval - val, val, evals, figure)


def training_steps(cfg: Config, train_volumes: int) -> int | None:
    """The run's training steps: train.max_steps, or its epochs over the training
    volumes as the loop counts them (data.all_slices: every slice of the grid, an upper
    bound); None for a budget in minutes or a model without training."""
    t = cfg.train
    if not MODELS[cfg.model].trainable or (t.max_minutes and not t.max_steps):
        return None
    return t.max_steps or t.epochs * epoch_steps(cfg, train_volumes)


def epoch_steps(cfg: Config, train_volumes: int) -> int:
    """Steps of one epoch, as the loop counts them (training/data.py `steps_per_epoch`)."""
    t = cfg.train
    if MODELS[cfg.model].input_kind == "volumes":
        n = train_volumes
    elif cfg.data.all_slices:
        n = train_volumes * cfg.data.volume_shape[2]
    else:
        n = train_volumes * t.slices_per_volume
    return max(1, math.ceil(n / t.batch_size))


def validation_passes(cfg: Config, steps: int | None, counts: DataCounts) -> int:
    """Validation passes of a training of `steps` steps: every train.val_every epochs
    (or train.val_every_steps steps) and at the end; none without validation volumes."""
    t = cfg.train
    if steps is None or not counts.val_volumes or not MODELS[cfg.model].trainable:
        return 0
    if t.val_every_steps > 0:
        return steps // t.val_every_steps + 1
    return steps // epoch_steps(cfg, counts.train_volumes) // t.val_every + 1


def job_volumes(plan: BenchmarkPlan, spec: RunSpec, counts: DataCounts) -> int:
    """Volumes the run reconstructs: the protocol's, and Figure 3's for the first run."""
    first = (spec.fold, spec.seed) == (plan.folds[0], plan.seeds[0])
    return counts.eval_volumes + (counts.figure_volumes if first else 0)


# ------------------------------------------------------------------ calibration


def config_key(cfg: Config) -> str:
    """The configuration less its seed and fold: runs that differ only there do the
    same work."""
    d = to_dict(replace(cfg, train=replace(cfg.train, seed=0), data=replace(cfg.data, fold=0)))
    return json.dumps(d, sort_keys=True, default=str)


def calibration_key(cfg: Config, device: str) -> str:
    """The configuration less its seed and fold, the device, the threads and the
    package's version (another version may compute differently)."""
    mine = [config_key(cfg), device, torch.get_num_threads(), __version__]
    return hashlib.sha256(json.dumps(mine).encode()).hexdigest()[:16]


def device_name(device: str) -> str:
    """The device a run would use, in words: "cpu", "cuda:0 (NVIDIA H200)"."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def random_training_data(cfg: Config, volumes: int):
    """TrainingData of `volumes` random volumes on the model grid, all brain: what
    `time_training_steps` draws its batches from (their size and shape are the run's)."""
    import SimpleITK as sitk

    from ..data.datasets import SliceSet
    from ..data.load import PreparedVolume
    from ..training.data import TrainingData

    depth = cfg.data.volume_shape[2] if MODELS[cfg.model].input_kind == "volumes" else 2
    shape = (*cfg.data.volume_shape[:2], depth)
    rng = np.random.default_rng(0)
    vols = [
        PreparedVolume(
            f"random{i}",
            rng.random(shape, dtype=np.float32),
            np.ones(shape, bool),
            None,
            sitk.Image(1, 1, 1, sitk.sitkUInt8),
        )
        for i in range(volumes)
    ]
    train = SliceSet(vols, cfg.geometry.image_size)
    return TrainingData(train, None, "random volumes (time estimate)")


def measure_step(cfg: Config, device: str) -> float | None:
    """Seconds per training step on `device` (None: nothing to train)."""
    from ..training.trainer import time_training_steps

    if not MODELS[cfg.model].trainable:
        return None
    t = cfg.train
    # one epoch gives batch_size slices (or volumes): enough volumes for one step
    timed = replace(
        cfg, train=replace(t, max_steps=TIMED_STEPS + WARMUP_STEPS, max_minutes=0.0, epochs=None)
    )
    data = random_training_data(timed, t.batch_size)
    return time_training_steps(timed, data, device, steps=TIMED_STEPS, warmup=WARMUP_STEPS)


VALIDATION_VOLUMES = 2  # random volumes of a timed validation pass


def measure_validation(cfg: Config, device: str) -> float | None:
    """Seconds of a validation pass per validation volume (`validation_loss`, on
    random volumes); None: nothing to train."""
    from ..training.trainer import validation_loss

    if not MODELS[cfg.model].trainable:
        return None
    dev = resolve_device(device)
    model = build_model(cfg).to(dev)
    val = random_training_data(cfg, VALIDATION_VOLUMES).train
    if dev.type == "cuda":  # warm-up
        validation_loss(model, val, cfg, dev)
    t0 = time.perf_counter()
    validation_loss(model, val, cfg, dev)  # a float: the device has finished
    return (time.perf_counter() - t0) / VALIDATION_VOLUMES


@torch.no_grad()
def measure_slice(cfg: Config, device: str) -> float:
    """Seconds to reconstruct one slice of a volume as the evaluation does: an
    untrained model of the configuration (the same computation) on random slices."""
    from ..pipeline.detect import reconstruct_volume

    dev = resolve_device(device)
    model = build_model(cfg).to(dev).eval()
    depth = cfg.data.volume_shape[2]
    n = min(depth, cfg.inference.batch_size) if dev.type == "cuda" else min(depth, CPU_SLICES)
    rng = np.random.default_rng(0)
    vol = rng.random((*cfg.data.volume_shape[:2], n), dtype=np.float32)
    gen = torch.Generator().manual_seed(0)
    if dev.type == "cuda":  # warm-up: lazy initialisation, kernel choice
        reconstruct_volume(model, vol[..., :1], gen, skip_empty_patches=False)
        _sync(dev)
    t0 = time.perf_counter()
    reconstruct_volume(model, vol, gen, skip_empty_patches=False)
    _sync(dev)
    return (time.perf_counter() - t0) / n


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def data_folder(plan: BenchmarkPlan, out: Path) -> Path | None:
    """The data the runs read, when it exists already: --data, or OUT/data once the
    synthetic benchmark is there."""
    data = Path(plan.data) if plan.data else out / "data"
    return data if plan.data or (data / "synthetic.json").exists() else None


def measure_protocol(cfg: Config, data: Path, fold: int, device: str) -> dict:
    """The evaluation's time apart from the reconstructions: the protocol (loading,
    thresholds, scoring, results and figures) run with Thresh, whose reconstruction is
    the image itself, on the first volume of every split and then on the first two;
    the difference gives the time per volume, the rest the time per run."""
    import tempfile

    from ..config import get_preset
    from ..pipeline.evaluate import evaluate_model, plan_evaluation

    thresh = build_model(replace(get_preset("thresh"), data=cfg.data))
    thresh = thresh.to(resolve_device(device))
    points = []
    with tempfile.TemporaryDirectory(prefix="maediff-time-") as tmp:
        for k in (1, 2):
            n = len(plan_evaluation(data, fold=fold, max_volumes=k).subjects())
            t0 = time.perf_counter()
            evaluate_model(
                thresh,
                data,
                Path(tmp) / f"eval{k}",
                label="Thresh",
                fold=fold,
                n_jobs=1,
                seed=0,
                max_volumes=k,
                progress=False,
                overwrite=True,
            )
            points.append((n, time.perf_counter() - t0))
    (n1, t1), (n2, t2) = points
    per_volume = (t2 - t1) / (n2 - n1) if n2 > n1 else t1 / n1
    per_volume = max(per_volume, 0.0)  # noise on a busy machine
    return {"run_s": max(t1 - n1 * per_volume, 0.0), "volume_s": per_volume}


def protocol_key(cfg: Config, data: Path, device: str) -> str:
    mine = ["protocol", str(data.resolve()), to_dict(cfg)["data"], device]
    mine += [torch.get_num_threads(), __version__]
    return hashlib.sha256(json.dumps(mine, default=str).encode()).hexdigest()[:16]


def load_cache(out: Path) -> dict:
    f = out / ESTIMATES_FILE
    if not f.exists():
        return {}
    try:
        entries = json.loads(f.read_text())["entries"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{f} is no estimates file ({e}); delete it to measure again") from e
    return entries if isinstance(entries, dict) else {}


BUSY_CORES = 0.5  # other processes' use, in cores, that makes a CPU measurement unfit


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process on this machine has used, this process's own),
    from /proc/stat; None where there is no /proc/stat (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(x) for x in fields[:8]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_cores(before, after, wall: float) -> float | None:
    """The cores other processes used on average between two `cpu_seconds` readings."""
    if before is None or after is None or wall <= 0:
        return None
    return ((after[0] - before[0]) - (after[1] - before[1])) / wall


def cached(out: Path, cache: dict, key: str, measure, say, what: str, device: str) -> dict | None:
    """cache[key], else `measure()` (when it is given) written to OUT/estimates.json.
    A CPU measurement during which other processes used cores (`BUSY_CORES`: two
    runs on a 2-core machine made one timed step 100 times slower) serves this
    listing but is not written, and the listing says so: the next one measures."""
    if key in cache:
        return cache[key]
    if measure is None:
        return None
    say(f"# measuring {what} ...", flush=True)
    before, t0 = cpu_seconds(), time.perf_counter()
    entry = {"what": what, "threads": torch.get_num_threads(), **measure()}
    entry["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    others = other_cores(before, cpu_seconds(), time.perf_counter() - t0)
    if resolve_device(device).type == "cpu" and others is not None and others > BUSY_CORES:
        entry["busy"] = round(others, 2)
        say(
            f"# other processes used {others:.1f} of {os.cpu_count()} cores while measuring: "
            "this time is too high and is not kept; list again when the machine is idle",
            flush=True,
        )
    cache[key] = entry
    kept = {k: v for k, v in cache.items() if "busy" not in v}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / ESTIMATES_FILE, json.dumps({"entries": kept}, indent=1))
    return entry


def calibration(
    cfg: Config, device: str, out: Path, cache: dict, measure: bool, say=print
) -> dict | None:
    """The model's step and slice times on `device`: cached, else measured when
    `measure`; None when neither."""

    def run() -> dict:
        return {
            "step_s": measure_step(cfg, device),
            "validation_s": measure_validation(cfg, device),
            "slice_s": measure_slice(cfg, device),
        }

    what = f"{cfg.name} on {device_name(device)}"
    key = calibration_key(cfg, device)
    return cached(out, cache, key, run if measure else None, say, what, device)


def protocol_time(
    plan: BenchmarkPlan, cfg: Config, out: Path, device: str, cache: dict, measure: bool, say
) -> dict | None:
    """The protocol's own time (`measure_protocol`) for the run's data; None before the
    data exists, or when not measured."""
    data = data_folder(plan, out)
    if data is None:
        return None

    def run() -> dict:
        return measure_protocol(cfg, data, plan.folds[0], device)

    key = protocol_key(cfg, data, device)
    what = f"the protocol on {data} (Thresh, 1 and 2 volumes per split)"
    return cached(out, cache, key, run if measure else None, say, what, device)


# ------------------------------------------------------------------ the jobs


def recorded_times(folder: Path) -> tuple[float, float] | None:
    """(training, evaluation) seconds a run recorded in timing.json; None without."""
    f = folder / "timing.json"
    if not f.exists():
        return None
    try:
        t = json.loads(f.read_text())
        return float(t.get("train_s", 0.0)), float(t["evaluate_s"]) + float(t.get("probe_s", 0))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def estimate_jobs(
    plan: BenchmarkPlan, out: Path, device: str = "auto", measure: bool = True, say=print
) -> list[JobEstimate]:
    """Every job of the plan, in its order (module docstring)."""
    runs = plan.runs()
    cache = load_cache(out)
    counts = {f: data_counts(plan, out, f) for f in plan.folds}
    # each finished run's recorded (training s, evaluation s), read once
    finished: dict[str, tuple[float, float] | None] = {}
    served: dict[str, str] = {}  # run -> the twin row's finished run that serves it
    for spec in runs:
        folder: Path | None = out / "runs" / spec.key
        if not is_done(folder):
            twin = twin_run(plan, spec, out)  # finished when not None: nothing left to do
            folder = out / "runs" / twin.key if twin else None
            served[spec.key] = twin.key if twin else ""
        finished[spec.key] = recorded_times(folder) if folder else None
    # configuration -> a finished run's (training s, evaluation s, volumes it evaluated)
    recorded: dict[str, tuple[float, float, int]] = {}
    configs = [plan.config(s) for s in runs]
    keys = [config_key(c) for c in configs]
    for spec, key in zip(runs, keys):
        if key not in recorded and (r := finished[spec.key]):
            recorded[key] = (*r, job_volumes(plan, spec, counts[spec.fold]))
    jobs = []
    for spec, key, cfg in zip(runs, keys, configs):
        steps = training_steps(cfg, counts[spec.fold].train_volumes)
        volumes = job_volumes(plan, spec, counts[spec.fold])
        own = finished[spec.key]
        if own:
            jobs.append(JobEstimate(steps, volumes, *own, "done", served.get(spec.key, "")))
            continue
        if key in recorded:  # its evaluation time per volume, for this run's volumes
            train_s, eval_s, n = recorded[key]
            jobs.append(JobEstimate(steps, volumes, train_s, eval_s * volumes / n, "recorded"))
            continue
        cal = calibration(cfg, device, out, cache, measure, say)
        if cal is None:
            train_s = _train_seconds(cfg, steps, None)  # known without a step time: none, minutes
            jobs.append(JobEstimate(steps, volumes, train_s, None, "not measured"))
            continue
        train_s = _train_seconds(cfg, steps, cal["step_s"])
        if train_s is not None and cal.get("validation_s"):
            passes = validation_passes(cfg, steps, counts[spec.fold])
            train_s += passes * counts[spec.fold].val_volumes * cal["validation_s"]
        eval_s = cal["slice_s"] * cfg.data.volume_shape[2] * volumes
        protocol = protocol_time(plan, cfg, out, device, cache, measure, say)
        if protocol is not None:
            eval_s += protocol["run_s"] + protocol["volume_s"] * volumes
        source = "measured" if protocol is not None else "measured, reconstruction only"
        jobs.append(JobEstimate(steps, volumes, train_s, eval_s, source))
    return jobs


def _train_seconds(cfg: Config, steps: int | None, step_s: float | None) -> float | None:
    if not MODELS[cfg.model].trainable:
        return 0.0
    if cfg.train.max_minutes and not cfg.train.max_steps:
        return 60.0 * cfg.train.max_minutes
    return None if steps is None or step_s is None else steps * step_s


def split_two(jobs: list[JobEstimate]) -> tuple[list[int], list[int]]:
    """The unfinished jobs in two groups of about equal time (the longest first, each
    to the group with less; without times, equal counts): the --run-index lists of two
    processes."""
    left = [(j.left_s or 0.0, i) for i, j in enumerate(jobs) if j.source != "done"]
    groups: tuple[list[int], list[int]] = ([], [])
    sums = [0.0, 0.0]
    for s, i in sorted(left, reverse=True):
        # equal sums (unknown times count 0) go to the group with fewer jobs
        k = 0 if (sums[0], len(groups[0])) <= (sums[1], len(groups[1])) else 1
        groups[k].append(i)
        sums[k] += s
    return sorted(groups[0]), sorted(groups[1])


def duration(seconds: float | None) -> str:
    """ "45 s", "12 min", "3.4 h"; "?" for unknown."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def job_line(job: JobEstimate) -> str:
    """What one job does and how long it takes: "train 300 steps (4 min), evaluate 70
    volumes (9 min): 13 min, measured"."""
    if job.steps is not None:
        train = f"train {job.steps} steps ({duration(job.train_s)})"
    elif job.train_s == 0.0:
        train = "no training"
    else:
        train = f"train ({duration(job.train_s)})"
    ev = f"evaluate {job.volumes} volumes ({duration(job.evaluate_s)})"
    return f"{train}, {ev}: {duration(job.total_s)}, {job.source}"


def summary_lines(jobs: list[JobEstimate], device: str, measure: bool) -> list[str]:
    """The header and the totals of the listing, as comment lines."""
    left = [j.left_s for j in jobs if j.source != "done"]
    done = sum(j.source == "done" for j in jobs)
    unknown = any(s is None for s in left)
    one = None if unknown else sum(left)  # type: ignore[arg-type]
    a, b = split_two(jobs)
    two = None
    if not unknown:
        two = max(sum(jobs[i].left_s or 0.0 for i in g) for g in (a, b))
    how = (
        f"measured on this machine: {device_name(device)}, {torch.get_num_threads()} thread(s)"
        if measure
        else "not measured (--no-estimate): recorded and cached times only"
    )
    return [
        f"# {len(jobs)} job(s), {done} finished; times are estimates, {how} "
        "(measured: steps x a timed step, slices x a timed slice, and the protocol's own "
        "time once the data exist; recorded: a finished run's times of the same "
        "configuration; docs/reliability.md, Estimates)",
        f"# left: {duration(one)} in one process; {duration(two)} in two processes with "
        f"the same speed each (--run-index {' '.join(map(str, a)) or '-'} and "
        f"--run-index {' '.join(map(str, b)) or '-'})",
    ]


__all__ = [
    "ESTIMATES_FILE",
    "JobEstimate",
    "estimate_jobs",
    "job_line",
    "split_two",
    "summary_lines",
]
