"""A plain, DDP-aware, resumable training loop (paper §4.3, PROTOCOL.md §5).

    data = prepare_training_data(cfg, data_dir="DATA")        # pDDPM layout, IXI fold
    summary = train(cfg, data, "runs/cpu-fold0", device="auto")

An epoch is pDDPM's: one random axial slice per training volume, shuffled. The
validation loss is computed on fixed draws (the same slices, timesteps, noise and
patch positions every time), so that it is comparable between epochs; the weights
with the lowest validation loss are kept as `best.safetensors`.

Run folder: config.yaml, best/last.safetensors (weights + config), last.state.safetensors
(optimizer, generators, counters), log.csv, tb/ (TensorBoard, when installed),
progress.png, model_card.md, train_summary.json.

Resuming (`resume=True`) restarts from the last checkpoint, written atomically at epoch
ends: on CPU with a fixed seed the resumed run ends with the same weights as an
uninterrupted one. Multi-GPU: start the same command under `torchrun`; each process
takes its share of every epoch's slices (global batch = train.batch_size) and rank 0
validates, logs and writes checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    load_train_state,
    model_card,
    save_train_state,
    save_weights,
    unwrap,
)
from .config import Config, describe, load_config, save_config, to_dict
from .data.datasets import SliceSet, load_volumes
from .data.splits import Subject, read_inputs, read_pddpm_split
from .model import MAEDiff, autocast_context
from .unet import count_parameters

LOG_FIELDS = ["step", "epoch", "time_s", "train_loss", "val_loss", "lr", "steps_per_s"]


# ------------------------------------------------------------------ setup


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" picks CUDA, then MPS, then CPU; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' requested but MPS is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = device_name in ("auto", "cuda") and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return Distributed(rank, world, local)


@dataclass
class TrainingData:
    train: SliceSet
    val: SliceSet | None
    description: str


def training_subjects(
    cfg: Config,
    data_dir: str | Path | None = None,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
) -> tuple[list[Subject], list[Subject], str]:
    """Subjects from pDDPM's layout (IXI fold cfg.data.fold) or from explicit lists."""
    if train_list is not None:
        train = read_inputs(train_list)
        val = read_inputs(val_list) if val_list is not None else []
        return (
            train,
            val,
            f"{train_list} ({len(train)} volumes), validation {val_list or 'none'} ({len(val)})",
        )
    if data_dir is None:
        raise ValueError("give a data folder in pDDPM's layout or a list of training scans")
    fold = cfg.data.fold
    train = read_pddpm_split(data_dir, "IXI", "train", fold)
    val = read_pddpm_split(data_dir, "IXI", "val", fold)
    return train, val, f"{data_dir}: IXI fold {fold} ({len(train)} train / {len(val)} val volumes)"


def prepare_training_data(
    cfg: Config, data_dir=None, train_list=None, val_list=None, progress: bool = True
) -> TrainingData:
    train_s, val_s, desc = training_subjects(cfg, data_dir, train_list, val_list)
    size, frac = cfg.geometry.image_size, cfg.data.min_brain_fraction
    train = SliceSet(load_volumes(train_s, cfg.data, "loading train", progress), size, frac)
    val = (
        SliceSet(load_volumes(val_s, cfg.data, "loading val", progress), size, frac)
        if val_s
        else None
    )
    return TrainingData(train, val, desc)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.train.optimizer]
    return cls(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


# ------------------------------------------------------------------ validation


@torch.no_grad()
def validation_loss(
    model: MAEDiff, val: SliceSet, cfg: Config, device: torch.device, slices_per_volume: int = 4
) -> float:
    """Mean Alg. 1 loss over fixed draws: the same slices, t, noise and patches each call."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.train.seed + 7919)
    pairs = [p for _ in range(slices_per_volume) for p in val.epoch_indices(g)]
    total, n = 0.0, 0
    for batch in val.batches(pairs, cfg.train.batch_size):
        with autocast_context(device, cfg.train.amp):
            loss = model.loss(batch.to(device), g)
        total += float(loss) * len(batch)
        n += len(batch)
    model.train()
    return total / max(n, 1)


# ------------------------------------------------------------------ logging


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
        rows = list(csv.DictReader(self.path.open()))
        keep = [r for r in rows if int(r["step"]) <= step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows(keep)

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
    from .evaluation.report import figure_curves

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


# ------------------------------------------------------------------ the loop


def train(
    cfg: Config,
    data: TrainingData,
    run_dir: str | Path,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    log_every: int = 10,
) -> dict[str, Any]:
    """Train MAEDiff; returns the summary also written to train_summary.json.

    Deliberately one loop in one function: what a resumed run must restore (counters,
    generators, optimizer, best loss) is all visible here; each step is `_step`."""
    ddp = setup_distributed(device)
    dev = resolve_device(device, ddp.local_rank)
    run_dir = Path(run_dir)
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _check_same_config(run_dir, cfg)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    model = MAEDiff(cfg).to(dev)
    optimizer = build_optimizer(model, cfg)
    gens = {
        "data": torch.Generator().manual_seed(cfg.train.seed),
        "noise": torch.Generator().manual_seed(cfg.train.seed * 1000 + 17 + ddp.rank),
        "global": torch.default_generator,
    }
    scaler = (
        torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and dev.type == "cuda" else None
    )
    counters = {
        "step": 0,
        "epoch": 0,
        "elapsed_s": 0.0,
        "best_val_loss": math.inf,
        "last_train_loss": math.nan,
    }
    log = RunLog(run_dir, ddp.main)
    if resume:
        counters = _resume(run_dir, model, optimizer, gens, scaler, ddp)
        log.truncate_after(counters["step"])
    net = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
        if ddp.world > 1
        else model
    )
    t = cfg.train
    per_rank = max(1, t.batch_size // ddp.world)
    steps_per_epoch = math.ceil(
        math.ceil(data.train.epoch_size(cfg.data.all_slices) / ddp.world) / per_rank
    )
    total = t.max_steps if t.max_steps else t.epochs * steps_per_epoch
    budget = f" ({t.max_minutes:g} min budget)" if t.max_minutes else ""
    bar = tqdm(
        total=None if budget and not t.max_steps else total,  # a time budget: no misleading ETA
        initial=min(counters["step"], total),
        desc=f"training {cfg.name}{budget}",
        unit="step",
        disable=not (progress and ddp.main),
        dynamic_ncols=True,
    )
    n_params = count_parameters(model)
    extra_base = {"data": data.description, "parameters": n_params}
    start = time.perf_counter() - counters["elapsed_s"]
    loss_ema, window_t, window_steps = None, time.perf_counter(), 0
    stop = counters["step"] >= total
    model.train()
    while not stop and counters["epoch"] < t.epochs:
        pairs = _shard(data.train.epoch_indices(gens["data"], cfg.data.all_slices), ddp)
        for batch in data.train.batches(pairs, per_rank):
            loss = _step(net, batch.to(dev), gens["noise"], optimizer, scaler, cfg, dev)
            counters["step"] += 1
            window_steps += 1
            loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
            counters["last_train_loss"] = loss
            bar.update()
            bar.set_postfix(loss=f"{loss_ema:.4f}", best_val=f"{counters['best_val_loss']:.4f}")
            if counters["step"] % log_every == 0:
                now = time.perf_counter()
                log.write(
                    step=counters["step"],
                    epoch=counters["epoch"],
                    time_s=f"{now - start:.1f}",
                    train_loss=f"{loss_ema:.6f}",
                    lr=t.lr,
                    steps_per_s=f"{window_steps / (now - window_t):.3f}",
                )
                window_t, window_steps = now, 0
            if t.max_steps and counters["step"] >= t.max_steps:
                stop = True
                break
        counters["epoch"] += 1
        counters["elapsed_s"] = time.perf_counter() - start
        if t.max_minutes and counters["elapsed_s"] >= 60 * t.max_minutes:
            stop = True
        last = stop or counters["epoch"] >= t.epochs
        if ddp.main and data.val is not None and (counters["epoch"] % t.val_every == 0 or last):
            v = validation_loss(model, data.val, cfg, dev)
            log.write(
                step=counters["step"],
                epoch=counters["epoch"],
                time_s=f"{counters['elapsed_s']:.1f}",
                val_loss=f"{v:.6f}",
                lr=t.lr,
            )
            if v < counters["best_val_loss"]:
                counters["best_val_loss"] = v
                save_weights(
                    model,
                    run_dir / "best.safetensors",
                    {**extra_base, **_public(counters), "val_loss": v},
                )
        if ddp.main and (counters["epoch"] % t.checkpoint_every == 0 or last):
            _checkpoint(run_dir, model, optimizer, gens, scaler, counters, extra_base)
        if ddp.world > 1:
            dist.barrier()
    bar.close()
    summary = {
        "config": describe(cfg),
        "steps": counters["step"],
        "epochs": counters["epoch"],
        "minutes": round(counters["elapsed_s"] / 60, 2),
        "best_val_loss": counters["best_val_loss"],
        "final_train_loss": loss_ema,
        "parameters": n_params,
        "device": str(dev),
        "world_size": ddp.world,
        "data": data.description,
    }
    if ddp.main:
        if (
            data.val is None or not (run_dir / "best.safetensors").exists()
        ):  # no validation: last is best
            save_weights(model, run_dir / "best.safetensors", {**extra_base, **_public(counters)})
        _checkpoint(run_dir, model, optimizer, gens, scaler, counters, extra_base)
        (run_dir / "model_card.md").write_text(model_card(cfg, {**extra_base, **_public(counters)}))
        (run_dir / "train_summary.json").write_text(json.dumps(_finite(summary), indent=2))
        plot_progress(run_dir)
    log.close()
    if ddp.world > 1:
        dist.destroy_process_group()
    return summary


def _shard(pairs: list, ddp: Distributed) -> list:
    """This rank's share of an epoch; padded by repeating so every rank takes the same
    number of steps (DistributedDataParallel needs matching backward passes)."""
    if ddp.world == 1:
        return pairs
    n = math.ceil(len(pairs) / ddp.world) * ddp.world
    padded = (pairs * math.ceil(n / len(pairs)))[:n]
    return padded[ddp.rank :: ddp.world]


def _step(net, batch, gen, optimizer, scaler, cfg: Config, dev: torch.device) -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(dev, cfg.train.amp):
        loss = net(batch, gen)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"training loss became {value}; lower train.lr or use train.amp=none"
        )
    return value


def _public(counters: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": counters["step"],
        "epoch": counters["epoch"],
        "best_val_loss": _finite(counters["best_val_loss"]),
    }


def _finite(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _checkpoint(run_dir: Path, model, optimizer, gens, scaler, counters, extra_base) -> None:
    """last.state.safetensors (all a resumed run needs, one atomic file) and
    last.safetensors (the weights for users)."""
    scaler_state = scaler.state_dict() if scaler else None
    save_train_state(
        run_dir / "last.state.safetensors",
        model,
        optimizer,
        _finite(dict(counters)),
        gens,
        scaler_state,
    )
    save_weights(model, run_dir / "last.safetensors", {**extra_base, **_public(counters)})


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    saved = run_dir / "config.yaml"
    if saved.exists() and to_dict(load_config(saved)) != to_dict(cfg):
        raise CheckpointError(f"cannot resume: the config in {saved} differs from the one given")


def _resume(run_dir: Path, model, optimizer, gens, scaler, ddp: Distributed) -> dict[str, Any]:
    state = run_dir / "last.state.safetensors"
    if not state.exists():
        raise CheckpointError(f"cannot resume: {run_dir} has no last.state.safetensors")
    counters, scaler_state = load_train_state(state, model, optimizer, gens)
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    if ddp.rank:  # only rank 0's generators are saved: give the others their own stream again
        gens["noise"].manual_seed(model.cfg.train.seed * 1000 + 17 + ddp.rank + counters["step"])
    if counters.get("best_val_loss") is None:
        counters["best_val_loss"] = math.inf
    return counters


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(path)


__all__ = [
    "TrainingData",
    "load_run_config",
    "prepare_training_data",
    "resolve_device",
    "train",
    "unwrap",
]
