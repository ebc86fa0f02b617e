"""The run log: `log.csv` (always, written by rank 0) and TensorBoard (`tb/`, when the
tensorboard package is installed), and the curves drawn from it (`progress.png`).

    log = RunLog(run_dir, enabled=True)
    log.train(step=10, epoch=0, phase="train", elapsed_s=3.2, loss=0.41, lr=1e-4, steps_per_s=3.1)
    log.validation(step=12, epoch=1, phase="train", elapsed_s=3.9, loss=0.38, lr=1e-4)

A training row carries the smoothed training loss, the learning rate of the last step
and the speed since the previous training row; a validation row the validation loss.
The trainer (training/trainer.py) writes them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..outputs import write_text_atomic

LOG_FIELDS = ["step", "epoch", "phase", "time_s", "train_loss", "val_loss", "lr", "steps_per_s"]


class RunLog:
    """CSV log (always) and TensorBoard (when the tensorboard package is installed)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "log.csv"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if not self.path.exists():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(LOG_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            self.tb = None

    def truncate_after(self, step: int) -> None:
        """Drop rows written after the checkpoint we resume from."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        try:
            with self.path.open(newline="") as f:
                for r in csv.DictReader(f):
                    if int(r["step"]) <= step:
                        keep.append(r)
        except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{self.path} is not the training log this run wrote ({type(e).__name__}: "
                f"{str(e)[:80]}); remove the lines that are not its rows, or the file, and resume again"
            ) from e
        buf = io.StringIO()  # rewritten through a temporary file: a kill keeps the old log
        w = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(keep)
        write_text_atomic(self.path, buf.getvalue())

    def train(
        self,
        step: int,
        epoch: int,
        phase: str,
        elapsed_s: float,
        loss: float,
        lr: float,
        steps_per_s: float,
    ) -> None:
        """A training row: `loss` smoothed over the last steps, `lr` (train.lr times the
        schedule) at the last step."""
        self.write(
            step=step,
            epoch=epoch,
            phase=phase,
            time_s=f"{elapsed_s:.1f}",
            train_loss=f"{loss:.6f}",
            lr=f"{lr:.6g}",
            steps_per_s=f"{steps_per_s:.3f}",
        )

    def validation(
        self, step: int, epoch: int, phase: str, elapsed_s: float, loss: float, lr: float
    ) -> None:
        self.write(
            step=step,
            epoch=epoch,
            phase=phase,
            time_s=f"{elapsed_s:.1f}",
            val_loss=f"{loss:.6f}",
            lr=f"{lr:.6g}",
        )

    def write(self, **row: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(
                {k: row.get(k, "") for k in LOG_FIELDS}
            )
        if self.tb is not None:
            for k in ("train_loss", "val_loss", "lr", "steps_per_s"):
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(k, float(row[k]), int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_progress(run_dir: Path) -> Path | None:
    """progress.png: the training and validation losses of log.csv over the steps."""
    from ..reporting.report import figure_curves

    path = run_dir / "log.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.open()))
    if not rows:
        return None

    def col(name):
        return [float(r[name]) if r[name] not in ("", None) else float("nan") for r in rows]

    return figure_curves(
        {"train loss": col("train_loss"), "validation loss": col("val_loss")},
        col("step"),
        run_dir / "progress.png",
    )


__all__ = ["LOG_FIELDS", "RunLog", "plot_progress"]
