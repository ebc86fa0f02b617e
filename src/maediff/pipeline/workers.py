"""Reconstruction of many volumes in single-threaded worker processes (CPU evaluation).

On a CPU, the narrow convolutions of the laptop-sized models keep two threads of one
process from being twice as fast as one: two processes with one thread each, one
volume each, finished an evaluation 11 % sooner than one process with two threads
(docs/history/0.3.0.md, "Evaluation cost"). Each worker loads the model from a safetensors
copy of the caller's weights and config (nothing is unpickled from disk), computes
exactly what the calling process would, and sends back arrays; results come back in
the order of the subjects, at most `2 * workers` volumes ahead of the consumer.

A worker ends itself soon after its parent's death (kill -9 included: it watches its
parent's process id every half second), instead of waiting on the task pipe forever. The
weights copy lives in TMPDIR/maediff-workers.HOST-PID.partial-XXXX, and a new pool
removes the copies of dead processes of this host (outputs.py).

    with ReconstructionPool(model, workers=2) as pool:
        for name, image, brain, seg, rec, affine in pool.map(subjects, data_cfg, seed):
            ...
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..outputs import exit_with_parent, owner_dead, owner_tag

if TYPE_CHECKING:
    from ..config import DataConfig
    from ..data.io import Subject
    from ..models import AnomalyModel

_MODEL = None  # the worker's model, loaded once by _init


def auto_workers(model: AnomalyModel, n_volumes: int) -> int:
    """Worker processes that `evaluate` uses when none are asked for: one per torch
    thread (at most 4) for a trainable model on the CPU, else none (in-process)."""
    if not model.trainable or n_volumes < 2:
        return 0
    if model.device.type != "cpu":
        return 0
    n = min(4, torch.get_num_threads(), n_volumes)
    return n if n >= 2 else 0


def check_workers(model: AnomalyModel, workers: int) -> None:
    """Worker processes reconstruct on the CPU, forked from this process: with the model
    on a GPU they would inherit a CUDA context and compile threads that a forked child
    cannot use (it hangs, or silently rebuilds the model on the CPU in fp32). Refused
    with one line saying what to do instead."""
    dev = model.device
    if workers and dev.type != "cpu":
        raise ValueError(
            f"--workers {workers}: worker processes reconstruct on the CPU, but the model is "
            f"on {dev}; use --workers 0 (the {dev.type} evaluation runs in this process), or "
            "--device cpu for CPU workers"
        )


def _init(weights: str, threads: int, parent: int) -> None:
    global _MODEL
    exit_with_parent(parent)
    torch.set_num_threads(threads)
    from ..weights import load_model

    _MODEL = load_model(weights, "cpu")


def _reconstruct(
    subject: Subject, data_cfg: DataConfig, seed: int
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    from .detect import reconstruct_subject

    return reconstruct_subject(_MODEL, subject, data_cfg, seed)


_COPY_PREFIX = "maediff-workers."
_COPY = re.compile(r"^maediff-workers\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.partial-")


def remove_stale_copies(folder: str | Path | None = None) -> list[Path]:
    """Remove the worker weights copies that killed processes of this host left in the
    temporary folder; returns what was removed."""
    removed = []
    for p in Path(folder or tempfile.gettempdir()).glob(f"{_COPY_PREFIX}*"):
        m = _COPY.match(p.name)
        if m and p.is_dir() and owner_dead(m["host"], int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class ReconstructionPool:
    """`workers` processes, each holding the model with `threads` torch threads."""

    def __init__(self, model: AnomalyModel, workers: int, threads: int = 1):
        from ..weights import save_weights

        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        check_workers(model, workers)
        self.workers = workers
        remove_stale_copies()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{_COPY_PREFIX}{owner_tag()}.partial-"))
        weights = self._dir / "model.safetensors"
        save_weights(model, weights)
        # fork, as torch's DataLoader workers: no re-import of the caller's script (spawn
        # would need an `if __name__ == "__main__"` guard there), and each child sets its
        # thread count before its first torch operation, as DataLoader workers do; but
        # spawn once this process has initialised CUDA (a GPU trained or ran here before):
        # a forked child cannot use the CUDA state it inherits
        ctx = multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=ctx,
            initializer=_init,
            initargs=(str(weights), threads, os.getpid()),
        )

    def map(
        self, subjects: Sequence[Subject], data_cfg: DataConfig, seed: int
    ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]]:
        """(name, image, brain mask, segmentation, reconstruction) per subject, in order."""
        pending: deque[Future] = deque()
        todo = iter(subjects)
        ahead = 2 * self.workers

        def submit() -> None:
            s = next(todo, None)
            if s is not None:
                pending.append(self._pool.submit(_reconstruct, s, data_cfg, seed))

        for _ in range(ahead):
            submit()
        while pending:
            result = pending.popleft().result()
            submit()
            yield result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ReconstructionPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ReconstructionPool", "auto_workers", "check_workers", "remove_stale_copies"]
