"""One DDP-aware, resumable training loop for every model of the registry (the
training setup of docs/method.md, "Training").

    data = prepare_training_data(cfg, data_dir="DATA")        # pDDPM layout, IXI fold
    summary = train(cfg, data, "runs/cpu-fold0", device="auto")

The loop knows only the model contract of models/base.py: `loss = model(batch, g,
group=...)` per optimizer group, phases that share the budget (f-AnoGAN: WGAN, then
encoder), slices or whole volumes as batches. An epoch is pDDPM's: train.slices_per_volume
random axial slices per training volume (or every slice with data.all_slices), shuffled;
volume models see every training volume once. The validation loss is computed on fixed
draws, so it is comparable between epochs; the weights with the lowest validation loss
in the last phase are kept as `best.safetensors`.

Run folder: config.yaml, run.json (where the data came from, for --resume),
best/last.safetensors (weights + config), last.state.safetensors (TrainState:
counters, optimizers, generators), log.csv, tb/ (TensorBoard, when installed),
progress.png, model_card.md, train_summary.json.

Resuming (`resume=True`) restarts from the last checkpoint, written atomically every
train.checkpoint_every epochs and at phase changes: on CPU with a fixed seed the resumed
run ends with the same weights as an uninterrupted one. Multi-GPU: start the same command
under `torchrun`; each process takes its share of every epoch (global batch =
train.batch_size) and rank 0 validates, logs and writes checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import __version__
from ..config import Config, describe, load_config, save_config, to_dict
from ..data.augment import augment_intensity
from ..data.bids import is_bids, read_bids, split_every
from ..data.datasets import SliceSet, load_volumes
from ..data.preprocess import learn_landmarks, nyul_standardise
from ..data.splits import Subject, read_inputs, read_pddpm_split
from ..device import autocast_context, resolve_device, speed_up
from ..models import MODELS, AnomalyModel, build_model, count_parameters
from ..models.base import Phase
from ..names import HEALTHY
from .checkpoint import CheckpointError, TrainState, model_card, save_weights

LOG_FIELDS = ["step", "epoch", "phase", "time_s", "train_loss", "val_loss", "lr", "steps_per_s"]


# ------------------------------------------------------------------ setup


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_backend(device_name: str) -> str:
    """NCCL for any CUDA device ("auto" with a GPU, "cuda", "cuda:1"), gloo otherwise."""
    cuda = device_name == "auto" or torch.device(device_name).type == "cuda"
    return "nccl" if cuda and torch.cuda.is_available() else "gloo"


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = distributed_backend(device_name)
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return Distributed(rank, world, local)


def wrap_distributed(
    model: AnomalyModel, dev: torch.device, find_unused_parameters: bool
) -> torch.nn.Module:
    """DistributedDataParallel around `model` (in a process group). On CUDA, BatchNorm
    layers (f-AnoGAN's generator and encoder) become SyncBatchNorm first, so that their
    statistics are those of the global batch as on one GPU; the conversion keeps the
    parameters (the optimizers hold them) and the state-dict keys."""
    if dev.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


@dataclass
class TrainingData:
    train: SliceSet
    val: SliceSet | None
    description: str
    sources: dict[str, str | None] = field(default_factory=dict)  # written to run.json
    landmarks: tuple[float, ...] = ()  # histogram landmarks of the training volumes


def training_subjects(
    cfg: Config,
    data_dir: str | Path | None = None,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    participants: dict[str, str] | None = None,
) -> tuple[list[Subject], list[Subject], str]:
    """Subjects from pDDPM's layout (IXI fold cfg.data.fold), from explicit lists, or
    from a BIDS data set (its scans without lesion labels among `participants`; without
    a validation list every 10th subject validates); every listed file is checked before
    anything is loaded."""
    if train_list is not None:
        if is_bids(train_list):  # healthy scans (no lesion labels) of the chosen participants
            train = read_bids(train_list, participants, lesions=False)
            if val_list is None:
                train, val = split_every(train, 0.1)
                return (
                    train,
                    val,
                    f"BIDS {train_list} ({len(train)} volumes), validation every 10th subject ({len(val)})",
                )
        else:
            train = read_inputs(train_list, participants)
        val = (
            read_inputs(val_list, participants, lesions=False if is_bids(val_list) else None)
            if val_list is not None
            else []
        )
        return (
            train,
            val,
            f"{train_list} ({len(train)} volumes), validation {val_list or 'none'} ({len(val)})",
        )
    if data_dir is None:
        raise ValueError("give a data folder in pDDPM's layout or a list of training scans")
    fold = cfg.data.fold
    train = read_pddpm_split(data_dir, HEALTHY, "train", fold)
    val = read_pddpm_split(data_dir, HEALTHY, "val", fold)
    return train, val, f"{data_dir}: IXI fold {fold} ({len(train)} train / {len(val)} val volumes)"


def prepare_training_data(
    cfg: Config,
    data_dir=None,
    train_list=None,
    val_list=None,
    progress: bool = True,
    participants: dict[str, str] | None = None,
) -> TrainingData:
    """Load the training (and validation) volumes. The histogram landmarks are learned
    from the training volumes (or taken from data.landmarks when set); with
    data.standardise="nyul" every volume is then standardised onto them."""
    train_s, val_s, desc = training_subjects(cfg, data_dir, train_list, val_list, participants)
    size, frac = cfg.geometry.image_size, cfg.data.min_brain_fraction
    raw = replace(cfg.data, standardise="none")
    train_v = load_volumes(train_s, raw, "loading train", progress)
    val_v = load_volumes(val_s, raw, "loading val", progress) if val_s else []
    landmarks = cfg.data.landmarks or learn_landmarks(train_v)
    if cfg.data.standardise == "nyul":
        for v in (*train_v, *val_v):
            v.image = nyul_standardise(v.image, v.brain_mask, landmarks)
    train = SliceSet(train_v, size, frac)
    val = SliceSet(val_v, size, frac) if val_v else None
    sources = {
        "data_dir": str(data_dir) if data_dir else None,
        "train_list": str(train_list) if train_list else None,
        "val_list": str(val_list) if val_list else None,
        "participants": participants,
    }
    return TrainingData(train, val, desc, sources, landmarks)


def build_optimizers(model: AnomalyModel, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per group the model declares (train.optimizer, train.lr by default)."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.train.optimizer]
    out = {}
    for name, g in model.optimizer_groups().items():
        kw: dict[str, Any] = {"lr": g.lr or cfg.train.lr, "weight_decay": cfg.train.weight_decay}
        if g.betas is not None:
            kw["betas"] = g.betas
        out[name] = cls(g.params, **kw)
        for pg in out[name].param_groups:
            pg.setdefault("initial_lr", pg["lr"])  # the schedule scales this one
    return out


# ------------------------------------------------------------------ weight averaging


def init_ema(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone().float()
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, n: int) -> None:
    """ema <- d * ema + (1 - d) * weights, with d = min(decay, (1 + n) / (10 + n))."""
    d = min(decay, (1 + n) / (10 + n))
    sd = model.state_dict()
    keys = list(ema)
    torch._foreach_lerp_([ema[k] for k in keys], [sd[k].detach().float() for k in keys], 1 - d)


class swapped_in:
    """Context: the model holds the averaged weights inside, its own weights after."""

    def __init__(self, model: torch.nn.Module, ema: dict[str, torch.Tensor] | None):
        self.model, self.ema, self.saved = model, ema, None

    def __enter__(self):
        if self.ema is not None:
            sd = self.model.state_dict()
            self.saved = {k: sd[k].detach().clone() for k in self.ema}
            self.model.load_state_dict(self.ema, strict=False)
        return self.model

    def __exit__(self, *exc):
        if self.saved is not None:
            self.model.load_state_dict(self.saved, strict=False)
        return False


# ------------------------------------------------------------------ batches


def epoch_batches(
    data: SliceSet, model: AnomalyModel, cfg: Config, gen: torch.Generator, per_rank: int, ddp
) -> Iterator[torch.Tensor]:
    """One epoch of this rank's batches: slices (B, 1, H, W) or volumes (B, S, 1, H, W)."""
    if model.input_kind == "volumes":
        return data.volume_batches(_shard(data.volume_order(gen), ddp), per_rank)
    pairs = data.epoch_indices(gen, cfg.data.all_slices, cfg.train.slices_per_volume)
    return data.batches(_shard(pairs, ddp), per_rank)


def steps_per_epoch(
    data: SliceSet, model: AnomalyModel, cfg: Config, per_rank: int, world: int
) -> int:
    n = (
        len(data)
        if model.input_kind == "volumes"
        else data.epoch_size(cfg.data.all_slices, cfg.train.slices_per_volume)
    )
    return math.ceil(math.ceil(n / world) / per_rank)


@torch.no_grad()
def validation_loss(
    model: AnomalyModel,
    val: SliceSet,
    cfg: Config,
    device: torch.device,
    slices_per_volume: int = 4,
) -> float:
    """Mean validation loss over fixed draws: the same slices (or volumes) and random
    inputs (t, noise, patches) every call."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.train.seed + 7919)
    if model.input_kind == "volumes":
        batches = val.volume_batches(list(range(len(val))), cfg.train.batch_size)
    else:
        pairs = [p for _ in range(slices_per_volume) for p in val.epoch_indices(g)]
        batches = val.batches(pairs, cfg.train.batch_size)
    total, n = 0.0, 0
    for batch in batches:
        with autocast_context(device, cfg.train.amp):
            loss = model.validation_loss(batch.to(device), g)
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
    from ..evaluation.report import figure_curves

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


@dataclass
class Run:
    """What one training run holds while it trains (built by `_setup`)."""

    cfg: Config
    data: TrainingData
    run_dir: Path
    dev: torch.device
    ddp: Distributed
    model: AnomalyModel
    net: torch.nn.Module  # the model, or DistributedDataParallel around it
    optimizers: dict[str, torch.optim.Optimizer]
    gens: dict[str, torch.Generator]
    scaler: Any
    log: RunLog
    state: TrainState
    per_rank: int
    total_steps: int
    start: float = 0.0
    loss_ema: float | None = None
    # the averaged weights (train.ema_decay > 0): a float copy of every floating-point
    # entry of the model's state dict
    ema: dict[str, torch.Tensor] | None = None
    lr_now: float = 0.0  # train.lr times the schedule's factor at the last step
    window: list[float] = field(default_factory=lambda: [time.perf_counter(), 0])

    @property
    def phase(self) -> Phase:
        return self.model.phases[self.state.phase]

    @property
    def last_phase(self) -> bool:
        return self.state.phase == len(self.model.phases) - 1

    def budget_used(self) -> float:
        """Fraction of the training budget spent: steps (max_steps or epochs) or minutes."""
        t = self.cfg.train
        used = self.state.step / max(self.total_steps, 1)
        if t.max_minutes:
            used = max(used, self.state.elapsed_s / (60 * t.max_minutes))
        return used

    def phase_progress(self) -> float:
        """Fraction of the current phase's share of the budget spent, in [0, 1]."""
        start = sum(ph.fraction for ph in self.model.phases[: self.state.phase])
        end = 1.0 if self.last_phase else start + self.phase.fraction
        return min(1.0, max(0.0, (self.budget_used() - start) / max(end - start, 1e-12)))

    def lr_factor(self) -> float:
        """Multiplier of every group's learning rate now: warm-up, then the schedule."""
        t = self.cfg.train
        f = 1.0
        if t.schedule == "cosine":
            cos = 0.5 * (1 + math.cos(math.pi * self.phase_progress()))
            f = t.min_lr_ratio + (1 - t.min_lr_ratio) * cos
        if t.warmup_steps and self.state.phase_step < t.warmup_steps:
            f *= (self.state.phase_step + 1) / t.warmup_steps
        return f

    def extra(self) -> dict[str, Any]:
        return {
            "data": self.data.description,
            "parameters": count_parameters(self.model),
            "description": self.model.description,
            **self.state.public(),
        }


def noise_generator(cfg: Config, rank: int, step: int = 0) -> torch.Generator:
    """Each rank draws its own training noise; a resumed non-zero rank reseeds by step
    (only rank 0's generator states are saved)."""
    return torch.Generator().manual_seed(cfg.train.seed * 1000 + 17 + rank + step)


def train(
    cfg: Config,
    data: TrainingData,
    run_dir: str | Path,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    log_every: int = 10,
) -> dict[str, Any]:
    """Train the model `cfg.model`; returns the summary also written to train_summary.json."""
    run = _setup(cfg, data, Path(run_dir), device, resume)
    bar = tqdm(
        total=None if cfg.train.max_minutes and not cfg.train.max_steps else run.total_steps,
        initial=min(run.state.step, run.total_steps),
        desc=f"training {cfg.name}"
        + (f" ({cfg.train.max_minutes:g} min budget)" if cfg.train.max_minutes else ""),
        unit="step",
        disable=not (progress and run.ddp.main),
        dynamic_ncols=True,
    )
    run.model.train()
    run.model.enter_phase(run.phase)
    while not _finished(run):
        stopped = train_one_epoch(run, bar, log_every)
        end_of_epoch(run, stopped)
    bar.close()
    return _finish(run)


def _setup(cfg: Config, data: TrainingData, run_dir: Path, device: str, resume: bool) -> Run:
    if cfg.model in MODELS and not MODELS[cfg.model].trainable:
        raise ValueError(f"model {cfg.model!r} has nothing to train")
    if data.landmarks and not cfg.data.landmarks:  # saved with the model (config.yaml)
        cfg = replace(cfg, data=replace(cfg.data, landmarks=data.landmarks))
    ddp = setup_distributed(device)
    dev = resolve_device(device, ddp.local_rank, distributed=ddp.world > 1)
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _check_same_config(run_dir, cfg)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(dev)
    speed = speed_up(model, dev, cfg.train.channels_last, cfg.train.compile, training=True)
    if ddp.main:
        (run_dir / "run.json").write_text(
            json.dumps({**data.sources, "version": __version__, "speed": speed}, indent=2)
        )
    optimizers = build_optimizers(model, cfg)
    ema = init_ema(model) if cfg.train.ema_decay > 0 else None
    gens = {
        "data": torch.Generator().manual_seed(cfg.train.seed),
        "noise": noise_generator(cfg, ddp.rank),
        "global": torch.default_generator,
    }
    scaler = (
        torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and dev.type == "cuda" else None
    )
    log = RunLog(run_dir, ddp.main)
    state = TrainState()
    if resume:
        state_file = run_dir / "last.state.safetensors"
        if not state_file.exists():
            raise CheckpointError(f"cannot resume: {run_dir} has no last.state.safetensors")
        state, scaler_state = TrainState.load(state_file, model, optimizers, gens, ema)
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)
        if ddp.rank:
            gens["noise"] = noise_generator(cfg, ddp.rank, state.step)
        log.truncate_after(state.step)
    net: torch.nn.Module = model
    if ddp.world > 1:
        net = wrap_distributed(model, dev, find_unused_parameters=len(optimizers) > 1)
    per_rank = max(1, cfg.train.batch_size // ddp.world)
    per_epoch = steps_per_epoch(data.train, model, cfg, per_rank, ddp.world)
    total = cfg.train.max_steps or cfg.train.epochs * per_epoch
    run = Run(
        cfg,
        data,
        run_dir,
        dev,
        ddp,
        model,
        net,
        optimizers,
        gens,
        scaler,
        log,
        state,
        per_rank,
        total,
        ema=ema,
    )
    run.start = time.perf_counter() - state.elapsed_s
    return run


def _finished(run: Run) -> bool:
    t = run.cfg.train
    return (
        run.state.epoch >= t.epochs
        or (t.max_steps > 0 and run.state.step >= t.max_steps)
        or (t.max_minutes > 0 and run.state.elapsed_s >= 60 * t.max_minutes)
    )


def train_one_epoch(run: Run, bar, log_every: int) -> bool:
    """One pass over this rank's share of the epoch; True when the budget ran out inside it."""
    for batch in epoch_batches(
        run.data.train, run.model, run.cfg, run.gens["data"], run.per_rank, run.ddp
    ):
        group = run.phase.groups[run.state.phase_step % len(run.phase.groups)]
        loss = _step(run, batch.to(run.dev), group)
        st = run.state
        st.step += 1
        st.phase_step += 1
        st.last_train_loss = loss
        st.elapsed_s = time.perf_counter() - run.start
        run.window[1] += 1
        run.loss_ema = (
            loss
            if run.loss_ema is None or st.phase_step == 1
            else 0.95 * run.loss_ema + 0.05 * loss
        )
        bar.update()
        bar.set_postfix(phase=run.phase.name, loss=f"{run.loss_ema:.4f}")
        if st.step % log_every == 0:
            _log_train(run)
        if _advance_phase(run):
            return False
        if run.cfg.train.max_steps and st.step >= run.cfg.train.max_steps:
            return True
    return False


def _advance_phase(run: Run) -> bool:
    """Move to the next phase when its share of the budget is used; checkpoint there."""
    bounds, acc = [], 0.0
    for ph in run.model.phases[:-1]:
        acc += ph.fraction
        bounds.append(acc)
    used = run.budget_used()
    if run.ddp.world > 1 and len(bounds):
        t = torch.tensor([used], dtype=torch.float64, device=run.dev)  # NCCL: CUDA tensors
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        used = float(t)
    target = sum(used >= b for b in bounds)
    if target <= run.state.phase:
        return False
    run.state.phase, run.state.phase_step = target, 0
    run.state.best_val_loss = math.inf
    run.model.enter_phase(run.phase)
    if run.ddp.main:
        _checkpoint(run)
    return True


def _step(run: Run, batch: torch.Tensor, group: str) -> float:
    opt = run.optimizers[group]
    f = run.lr_factor()
    for pg in opt.param_groups:
        pg["lr"] = pg["initial_lr"] * f
    run.lr_now = run.cfg.train.lr * f
    run.model.zero_grad(set_to_none=True)
    if run.cfg.augment.enabled and batch.dim() == 4:
        batch = augment_intensity(batch, run.cfg.augment, run.gens["noise"])
    with autocast_context(run.dev, run.cfg.train.amp):
        loss = run.net(batch, run.gens["noise"], group=group)
    scaler = run.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if run.cfg.train.grad_clip > 0:
        params = [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, run.cfg.train.grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    if run.ema is not None:
        update_ema(run.ema, run.model, run.cfg.train.ema_decay, run.state.phase_step)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"training loss ({group}) became {value}; lower train.lr or use train.amp=none"
        )
    return value


def _log_train(run: Run) -> None:
    now = time.perf_counter()
    t0, n = run.window
    run.log.write(
        step=run.state.step,
        epoch=run.state.epoch,
        phase=run.phase.name,
        time_s=f"{run.state.elapsed_s:.1f}",
        train_loss=f"{run.loss_ema:.6f}",
        lr=f"{run.lr_now:.6g}",  # train.lr times the schedule, at the last step
        steps_per_s=f"{n / max(now - t0, 1e-9):.3f}",
    )
    run.window = [now, 0]


def end_of_epoch(run: Run, stopped: bool) -> None:
    """Count the epoch; validate, keep the best weights and checkpoint on schedule."""
    st, t = run.state, run.cfg.train
    st.epoch += 1
    st.elapsed_s = time.perf_counter() - run.start
    if run.ddp.world > 1:  # every rank must agree to stop (time budgets differ by rank)
        flag = torch.tensor([float(stopped or _finished(run))], device=run.dev)  # NCCL: on GPU
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopped = bool(flag.item())
    if stopped and not _finished(run) and t.max_minutes:
        # another rank's time budget ran out first: end this rank's loop with it
        st.elapsed_s = max(st.elapsed_s, 60 * t.max_minutes)
    last = stopped or _finished(run)
    if (
        run.ddp.main
        and run.data.val is not None
        and run.last_phase
        and (st.epoch % t.val_every == 0 or last)
    ):
        with swapped_in(run.model, run.ema):
            v = validation_loss(run.model, run.data.val, run.cfg, run.dev)
            if v < st.best_val_loss:
                st.best_val_loss = v
                save_weights(
                    run.model, run.run_dir / "best.safetensors", {**run.extra(), "val_loss": v}
                )
        run.log.write(
            step=st.step,
            epoch=st.epoch,
            phase=run.phase.name,
            time_s=f"{st.elapsed_s:.1f}",
            val_loss=f"{v:.6f}",
            lr=f"{run.lr_now:.6g}",
        )
    if run.ddp.main and (st.epoch % t.checkpoint_every == 0 or last):
        _checkpoint(run)
    if run.ddp.world > 1:
        dist.barrier()


def _checkpoint(run: Run) -> None:
    """last.state.safetensors (all a resumed run needs, one atomic file) and
    last.safetensors (the weights for users)."""
    run.state.save(
        run.run_dir / "last.state.safetensors",
        run.model,
        run.optimizers,
        run.gens,
        run.scaler.state_dict() if run.scaler else None,
        run.ema,
    )
    with swapped_in(run.model, run.ema):
        save_weights(run.model, run.run_dir / "last.safetensors", run.extra())


def _finish(run: Run) -> dict[str, Any]:
    st, cfg = run.state, run.cfg
    summary = {
        "config": describe(cfg),
        "model": cfg.model,
        "steps": st.step,
        "epochs": st.epoch,
        "minutes": round(st.elapsed_s / 60, 2),
        "best_val_loss": st.best_val_loss,
        "final_train_loss": run.loss_ema,
        "parameters": count_parameters(run.model),
        "device": str(run.dev),
        "world_size": run.ddp.world,
        "data": run.data.description,
    }
    if run.ddp.main:
        if run.data.val is None or not (run.run_dir / "best.safetensors").exists():
            with swapped_in(run.model, run.ema):  # last is best
                save_weights(run.model, run.run_dir / "best.safetensors", run.extra())
        _checkpoint(run)
        (run.run_dir / "model_card.md").write_text(model_card(cfg, run.extra()))
        (run.run_dir / "train_summary.json").write_text(json.dumps(_finite(summary), indent=2))
        plot_progress(run.run_dir)
    run.log.close()
    if run.ddp.world > 1:
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


def _finite(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    saved = run_dir / "config.yaml"
    if saved.exists() and to_dict(load_config(saved)) != to_dict(cfg):
        raise CheckpointError(f"cannot resume: the config in {saved} differs from the one given")


def read_run_sources(run_dir: str | Path) -> dict[str, Any]:
    """Where a run's data came from (run.json), so that --resume needs no data flags."""
    p = Path(run_dir) / "run.json"
    return json.loads(p.read_text()) if p.exists() else {}


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(path)


__all__ = [
    "Run",
    "TrainingData",
    "build_optimizers",
    "end_of_epoch",
    "load_run_config",
    "prepare_training_data",
    "read_run_sources",
    "train",
    "train_one_epoch",
]
