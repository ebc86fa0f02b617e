"""`maediff benchmark`: the paper's Tables 1 and 2 and Figure 3 as one resumable job.

    plan = BenchmarkPlan.from_args(table="1", scale="cpu", seeds=[0, 1, 2], minutes=3)
    run_benchmark(plan, Path("bench"))

Every (model, fold, seed) is one run in its own folder (benchmark/run.py). Starting
the command again skips finished runs and resumes an interrupted one at its first
missing step. Runs are independent: `--list` prints one command per run with its
estimated time (benchmark/estimate.py), and `--run-index N` does run N alone (a job
array fills one folder from many GPUs; a per-run lock keeps two processes off the same
run, benchmark/locks.py; give each process its own GPU with CUDA_VISIBLE_DEVICES, or
--device cuda:I; a process with LOCAL_RANK set takes cuda:LOCAL_RANK; not under
torchrun, whose ranks would join one process group for different runs); a final call
(or `--collect`) writes the tables from whatever has finished (benchmark/collect.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..data.synthetic import SynthConfig, generate_benchmark
from ..device import reset_compiled, resolve_device
from ..outputs import check_own_folder
from ..reporting.files import write_atomic
from .collect import collect
from .estimate import estimate_jobs, job_line, summary_lines
from .locks import file_lock, run_lock
from .plan import BenchmarkPlan, RunSpec
from .run import execute_run
from .status import is_done, twin_run

Say = Callable[..., None]  # print, or a caller's: takes a line (and flush=)


def check_data(plan: BenchmarkPlan) -> None:
    """--data, when given, is in pDDPM's layout."""
    if plan.data and not (Path(plan.data) / "splits").is_dir():
        raise ValueError(f"--data {plan.data} is not in pDDPM's layout (no splits/ folder)")


def ensure_data(plan: BenchmarkPlan, out: Path, progress: bool) -> Path:
    """--data, or the synthetic benchmark in OUT/data, generated once: processes that
    start together wait for the first one's (a lock), and find it complete."""
    if plan.data:
        check_data(plan)
        return Path(plan.data)
    data = out / "data"
    with file_lock(out / ".data.lock", wait=True):
        if not (data / "synthetic.json").exists():
            if data.exists() and any(data.iterdir()):
                raise ValueError(
                    f"{data} exists but holds no synthetic benchmark (no synthetic.json); "
                    "move it away, or give --data"
                )
            generate_benchmark(data, SynthConfig(), overwrite=True, progress=progress)
    return data


def check_plan(plan: BenchmarkPlan, out: Path) -> None:
    """The budget and data of an existing benchmark folder cannot change under it."""
    path = out / "benchmark.json"
    mine = {
        k: v
        for k, v in asdict(plan).items()
        if k in ("scale", "data", "minutes", "steps", "max_volumes", "overrides")
    }
    if path.exists():
        saved = json.loads(path.read_text()).get("shared", {})
        if saved != mine:
            diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
            raise ValueError(
                f"{out} holds a benchmark with other shared settings (saved, given): {diff}; "
                "use another output folder"
            )
    else:
        write_atomic(path, json.dumps({"shared": mine}, indent=2))


def process_device(device: str) -> str:
    """The device this benchmark process trains and evaluates on. With LOCAL_RANK set
    (several processes started on one machine), "auto" and "cuda" take cuda:LOCAL_RANK
    instead of all taking GPU 0; an explicit "cuda:I" is kept. Under torchrun
    (WORLD_SIZE > 1) it refuses: every rank would join one process group, and their
    runs are different ones."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ValueError(
            f"benchmark does not run under torchrun (WORLD_SIZE={world}): each run trains "
            "in one process, and torchrun's ranks would join one process group for "
            "different runs. Start one process per GPU instead, each with --run-index N "
            "and its own GPU (CUDA_VISIBLE_DEVICES=I or --device cuda:I)"
        )
    local = os.environ.get("LOCAL_RANK")
    if local is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(local)}"
    return device


BENCHMARK_MARKS = ("benchmark.json", "estimates.json")  # a folder benchmark made


def run_benchmark(
    plan: BenchmarkPlan,
    out: Path,
    device: str = "auto",
    list_runs: bool = False,
    run_index: Sequence[int] | int | None = None,
    collect_only: bool = False,
    progress: bool = True,
    estimate: bool = True,
    say: Say = print,
) -> int:
    """Every run of the plan (or those of `run_index`), then the tables; `list_runs`
    only prints the jobs with their time estimates (measured unless `estimate` is
    False: benchmark/estimate.py)."""
    check_own_folder(out, "benchmark", marks=BENCHMARK_MARKS)  # the output rule (outputs.py)
    runs = plan.runs()
    if list_runs:
        list_jobs(plan, out, device, estimate, say)
        return 0
    indices = [run_index] if isinstance(run_index, int) else list(run_index or range(len(runs)))
    bad = [i for i in indices if not 0 <= i < len(runs)]
    if bad:
        raise ValueError(f"--run-index {bad} must be in 0..{len(runs) - 1}")
    if not collect_only:  # everything a run needs is checked before the folder is claimed
        device = process_device(device)
        resolve_device(device)
        check_data(plan)
    out.mkdir(parents=True, exist_ok=True)
    check_plan(plan, out)
    if not collect_only:
        data = ensure_data(plan, out, progress)
        todo = [runs[i] for i in indices]
        _run_all(plan, todo, out, data, device, progress, say)
    return collect(plan, out, say)


def list_jobs(
    plan: BenchmarkPlan, out: Path, device: str, measure: bool = True, say: Say = print
) -> None:
    """One command per run, each with what it does and its estimated time, and the
    totals for one process and for two (benchmark/estimate.py)."""
    check_data(plan)  # the estimate reads its splits
    jobs = estimate_jobs(plan, out, device, measure, say)
    for line in summary_lines(jobs, device, measure):
        say(line)
    for i, (spec, job) in enumerate(zip(plan.runs(), jobs)):
        served = f" (as {job.served_by}, the same configuration)" if job.served_by else ""
        say(f"# {i}: {spec.key}: {job_line(job)}{served}\n{plan.command(out, device, i)}")
    say(f"# then collect: {plan.command(out, device)} --collect")


def _run_all(
    plan, todo: list[RunSpec], out: Path, data: Path, device: str, progress: bool, say: Say = print
) -> None:
    say(f"benchmark: {len(todo)} run(s), {plan.budget()}, scale {plan.scale} -> {out}")
    spent: list[float] = []
    for i, spec in enumerate(todo, 1):
        folder = out / "runs" / spec.key
        if is_done(folder):
            say(f"[{i}/{len(todo)}] {spec.key}: done")
            continue
        if (twin := twin_run(plan, spec, out)) is not None:
            say(f"[{i}/{len(todo)}] {spec.key}: done as {twin.key} (the same configuration)")
            continue
        with run_lock(folder) as mine:
            if not mine:
                say(f"[{i}/{len(todo)}] {spec.key}: running in another process, skipped")
                continue
            if is_done(folder):  # finished by another process since the first look
                say(f"[{i}/{len(todo)}] {spec.key}: done")
                continue
            left = len(todo) - i + 1
            eta = f", about {np.mean(spent) * left / 60:.0f} min left" if spent else ""
            say(f"[{i}/{len(todo)}] {spec.key}: training and evaluating{eta}", flush=True)
            t0 = time.perf_counter()
            reset_compiled()  # each run compiles its own model, within the recompile limit
            timing = execute_run(plan, spec, out, data, device, progress)
            spent.append(time.perf_counter() - t0)
            say(
                f"[{i}/{len(todo)}] {spec.key}: finished in {spent[-1] / 60:.1f} min {timing}",
                flush=True,
            )


__all__ = ["check_plan", "ensure_data", "list_jobs", "process_device", "run_benchmark"]
