"""What the benchmark and study scripts share, so that each says only what it measures:

- the records: `cpu_name` (the CPU with its bf16-relevant ISA), `mean_sd` (the one
  "mean ± sd" of every table: the sample standard deviation, n - 1, as the package's
  tables), `slug` (a row's folder name);
- the job scaffolding of the resumable studies (recipe_study.py, learning_curve.py,
  sweep_cpu_scale.py): `add_job_arguments` (--threads, --run-index I J, --list,
  --collect), `pick` (every J-th job from job I) and `set_threads`;
- the one timer (`median_seconds`: the median of timed calls, the device's queue
  drained around each), the one training-step timer (`train_step_seconds`: the
  trainer's per-group step on one batch) and the one matmul peak (`matmul_peak`).
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def cpu_name() -> str:
    """The CPU's model name (Linux) and its widest vector extension that bears on the
    precision ("AMD EPYC (AVX512-BF16)", "... (AMX)", "... (AVX2)"), or "unknown": one
    model name covers CPUs with and without native bf16."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"),
                        ("avx512f", "AVX512"), ("avx2", "AVX2")):  # fmt: skip
        if flag in flags:
            return f"{name} ({label})"
    return name


def mean_sd(values: Sequence[float]) -> str:
    """ "-" for none, the value for one, mean ± sample sd (n - 1) for more."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def slug(name: str) -> str:
    """A row's or variant's folder name: lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------- job scaffolding


def add_job_arguments(ap: argparse.ArgumentParser, threads: int = 0, what: str = "job") -> None:
    """The options every resumable study takes, with one meaning everywhere."""
    ap.add_argument(
        "--threads",
        type=int,
        default=threads,
        help=f"torch threads per process (0: torch's default; default {threads})",
    )
    ap.add_argument(
        "--run-index",
        type=int,
        nargs=2,
        metavar=("I", "J"),
        help=f"every J-th {what} from {what} I (one process each, e.g. 0 2 and 1 2)",
    )
    ap.add_argument("--list", action="store_true", help=f"print the {what}s and exit")
    ap.add_argument("--collect", action="store_true", help="only print the table of finished runs")


def pick(todo: Sequence[T], run_index: Sequence[int] | None) -> list[T]:
    """Every J-th item from item I, or all of them."""
    if not run_index:
        return list(todo)
    i, j = run_index
    if j < 1 or not 0 <= i < j:
        raise SystemExit(f"--run-index {i} {j}: give 0 <= I < J")
    return list(todo)[i::j]


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- timing


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], Any], repeats: int, device: torch.device | str | None = None, warmup: int = 0
) -> float:
    """The median wall time of `repeats` calls of fn() after `warmup` untimed ones, the
    device's queue drained before and after each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    n: int | None = None,
    repeats: int = 5,
) -> float:
    """GFLOP/s of an n x n matmul in `dtype` (n: 2048 on a CPU, 8192 on a GPU), the
    median of `repeats` timed products after one warm-up."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, device, warmup=1) / 1e9


def train_step_seconds(
    model,
    cfg,
    steps: int,
    repeats: int,
    device: torch.device | str = "cpu",
    amp: str = "none",
) -> float:
    """Seconds per optimizer step on one batch of the configuration's size (volumes
    for a model whose input is volumes), through the trainer's per-group step: each
    step trains the next parameter group of the model's phases; the median of
    `repeats` timings of `steps` steps, after one untimed step."""
    from maediff.device import autocast_context
    from maediff.training.trainer import build_optimizers

    device = torch.device(device)
    opts = build_optimizers(model, cfg)
    H, B = cfg.geometry.image_size, cfg.train.batch_size
    volumes = model.input_kind == "volumes"
    shape = (B, cfg.data.volume_shape[2], 1, H, H) if volumes else (B, 1, H, H)
    x, g = torch.rand(shape, device=device), torch.Generator(device).manual_seed(0)
    groups = itertools.cycle([grp for ph in model.phases for grp in ph.groups])

    def one_step() -> None:
        group = next(groups)
        model.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            loss = model(x, g, group=group)
        loss.backward()
        opts[group].step()

    one_step()

    def run() -> None:
        for _ in range(steps):
            one_step()

    return median_seconds(run, repeats, device) / steps


def finish_report(report: dict, text: str, json_path: Path | None) -> int:
    """Print a check's table, write its report as JSON where asked, and return its exit
    status: 1 when the report lists failures."""
    import json
    import sys

    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
    sys.stdout.flush()
    return 1 if report.get("failures") else 0
