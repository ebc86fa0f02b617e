"""One DDP-aware, resumable training loop for every model of the registry (the
training setup of docs/method.md, "Training").

    data = prepare_training_data(cfg, data_dir="DATA")        # pDDPM layout, IXI fold
    summary = train(cfg, data, "runs/cpu-fold0", device="auto")

`train` reads top to bottom: the setup, then one loop over steps in which the epochs
are the data running out, one stopping rule (`_stop`: the step, epoch and time
budgets, and the end of each phase's share), then the phase change, validation,
checkpoints and the log as calls. The loop knows only the model contract of
models/base.py: `loss = model(batch, g, group=...)` per optimizer group, phases that
share the budget (f-AnoGAN: WGAN, then encoder), slices or whole volumes as batches.
The validation loss is computed on fixed draws, so it is comparable between epochs;
the weights with the lowest validation loss in the last phase are kept as
`best.safetensors`.

Around it: training/data.py loads the training data and cuts epochs into batches,
training/logging.py writes log.csv and TensorBoard, training/distributed.py holds
what torchrun needs, training/checkpoint.py the files. The names other modules use
(`prepare_training_data`, `TrainingData`, `RunLog`, `setup_distributed`, ...) can be
imported from here as well.

Run folder: config.yaml, run.json (where the data came from, for --resume),
best/last.safetensors (weights + config), last.state.safetensors (TrainState:
counters, optimizers, generators), log.csv, tb/ (TensorBoard, when installed),
progress.png, model_card.md, train_summary.json.

Resuming (`resume=True`) restarts from the last checkpoint, written atomically every
train.checkpoint_every epochs (or train.checkpoint_every_minutes, at an epoch end) and at
phase changes: on CPU with a fixed seed the resumed run ends with the same weights as an
uninterrupted one. Multi-GPU: start the same command under `torchrun`; each process
takes its share of every epoch (global batch = train.batch_size, divisible by the
processes) and of every validation, and rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..config import Config, describe, from_dict, save_config, to_dict
from ..data.augment import augment_intensity
from ..data.datasets import SliceSet
from ..device import (
    NOT_COMPILE_ERRORS,
    autocast_context,
    fall_back_to_eager,
    grad_scaler,
    resolve_device,
    runs_compiled,
    speed_up,
    to_device,
)
from ..memory import check_training_memory
from ..models import MODELS, AnomalyModel, build_model, count_parameters
from ..models.base import Phase
from ..outputs import clean_stale, record_outputs, write_text_atomic
from .checkpoint import CheckpointError, TrainState, load_saved_config, model_card, save_weights
from .data import (
    TrainingData,
    epoch_batches,
    steps_per_epoch,
)
from .distributed import (
    Distributed,
    barrier,
    check_global_batch,
    largest_over_ranks,
    leave_distributed,
    mean_over_ranks,
    setup_distributed,
    sum_over_ranks,
    world_size,
    wrap_distributed,
)
from .logging import RunLog, plot_progress

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
    """Train the model `cfg.model`; returns the summary also written to train_summary.json.

    One loop over steps; the stopping rule `_stop`, asked after every step, says
    whether the phase, the epoch or the run ends there."""
    run = _setup(cfg, data, Path(run_dir), device, resume)
    st = run.state
    bar = _progress_bar(run, progress)
    run.model.train()
    run.model.enter_phase(run.phase)
    batches = _epoch(run)  # drawn when its first batch is taken
    stop = _stop(run)  # a resumed run may have nothing left to do
    while not stop.run:
        batch, last_batch = next(batches)
        # forward, backward, update, EMA; the loss stays on the device until read
        loss = _step(run, to_device(batch, run.dev), run.group)
        _count(run, loss)
        bar.update()
        if st.step % log_every == 0:
            _read_losses(run, bar)
            _log_train(run)
        stop = _stop(run, last_batch)
        if stop.epoch:  # counted before the stage-boundary checkpoint, which ends it too
            st.epoch += 1
        if stop.phase is not None:  # f-AnoGAN: from the WGAN to the encoder
            _read_losses(run, bar)
            _enter_phase(run, stop.phase)
            if run.ddp.main:
                _checkpoint(run)
        if stop.epoch:
            validate, checkpoint = _validation_due(run, stop), _checkpoint_due(run, stop)
            if validate or checkpoint:
                _read_losses(run, bar)
            if validate:
                _validate(run)
            if checkpoint and run.ddp.main:
                _checkpoint(run)
            barrier(run.ddp)
            batches = _epoch(run)  # a phase change drops the rest of the epoch
    bar.close()
    return _finish(run)


def _validation_due(run: Run, stop: Stop) -> bool:
    """At the end of an epoch: validate every train.val_every epochs, or, with
    train.val_every_steps, at the first epoch end after each multiple of that many
    steps; and when the run ends. Every rank validates its share (`validates`)."""
    if not run.validates:
        return False
    st, t = run.state, run.cfg.train
    if stop.run:
        return True
    if t.val_every_steps > 0:
        return st.step // t.val_every_steps > run.epoch_start_step // t.val_every_steps
    return st.epoch % t.val_every == 0


def _checkpoint_due(run: Run, stop: Stop) -> bool:
    """At the end of an epoch: a checkpoint every train.checkpoint_every epochs, or,
    with train.checkpoint_every_minutes, at the first epoch end after that many minutes
    since the last one; and when the run ends. Rank 0 decides (and writes)."""
    t = run.cfg.train
    if not run.ddp.main:
        return False
    if stop.run:
        return True
    if t.checkpoint_every_minutes > 0:
        return time.perf_counter() - run.last_checkpoint >= 60 * t.checkpoint_every_minutes
    return run.state.epoch % t.checkpoint_every == 0


@dataclass(frozen=True)
class Stop:
    """What ends after a step: the answer of `_stop`."""

    phase: int | None = None  # the phase to enter now: the current one's share is spent
    epoch: bool = False  # the epoch: its batches ran out, or the phase or the run ends
    run: bool = False


def _stop(run: Run, last_batch: bool | None = None) -> Stop:
    """The one stopping rule. Asked after every step (`last_batch`: this rank's batches of
    the epoch ran out) and once before the first (None), where a resumed run may find
    its budget spent.

    - The phase ends when the budget used (`Run.budget_used`) reaches the end of its
      share (the fractions of model.phases); the ranks go by the largest.
    - The epoch ends when its batches run out, with the phase, and with the run.
    - The run ends after train.max_steps steps, or at the end of an epoch once
      train.epochs epochs are done or train.max_minutes have passed (time is looked
      at when an epoch ends). The ranks stop together: their clocks differ, and the
      first to run out of time stops them all.
    """
    st, t = run.state, run.cfg.train
    steps_spent = t.max_steps > 0 and st.step >= t.max_steps
    time_spent = t.max_minutes > 0 and st.elapsed_s >= 60 * t.max_minutes
    if last_batch is None:  # at the end of an epoch, counted already
        return Stop(run=st.epoch >= t.epoch_limit or steps_spent or time_spent)
    bounds, acc = [], 0.0  # where each phase but the last ends, as a budget fraction
    for ph in run.model.phases[:-1]:
        acc += ph.fraction
        bounds.append(acc)
    phase = None
    if bounds:
        used = run.budget_used()
        if run.ddp.world > 1:
            used = largest_over_ranks(used, run.dev)
        target = sum(used >= b for b in bounds)
        phase = target if target > st.phase else None
    epoch = last_batch or phase is not None or steps_spent
    done = steps_spent or (epoch and (st.epoch + 1 >= t.epoch_limit or time_spent))
    if epoch and run.ddp.world > 1:
        agreed = largest_over_ranks(float(done), run.dev) > 0
        if agreed and not done and t.max_minutes > 0:
            # another rank's time ran out first: this one's counts as spent too, so
            # that a resumed run stops here as well
            st.elapsed_s = max(st.elapsed_s, 60 * t.max_minutes)
        done = agreed
    return Stop(phase, epoch, done)


def _epoch(run: Run) -> Iterator[tuple[torch.Tensor, bool]]:
    """This rank's batches of the next epoch, each with whether it is the epoch's last.
    The epoch's order is drawn from the data generator when its first batch is taken
    (after the previous epoch's checkpoint, so a resumed run draws it again)."""
    run.epoch_start_step = run.state.step
    batches = epoch_batches(
        run.data.train, run.model, run.cfg, run.gens["data"], run.per_rank, run.ddp
    )
    batch = next(batches)
    for following in batches:
        yield batch, False
        batch = following
    yield batch, True


def _step(run: Run, batch: torch.Tensor, group: str) -> torch.Tensor:
    """One update of the optimizer `group` (`_update`). While a network runs compiled,
    an error of the step (not running out of memory) is taken for compilation's: the
    forward compiles at its first call, inside compile_with_fallback, but AOTAutograd
    compiles the backward graph at the first `loss.backward()` (and again at a new batch
    shape, the epoch's last partial batch), outside it. Then Dynamo is reset, every
    network runs eager with a warning, and the step is redone from the random state it
    started with; an error of the eager step is raised."""
    if not runs_compiled(run.model):
        return _update(run, batch, group)
    rng = _rng_state(run)
    try:
        return _update(run, batch, group)
    except NOT_COMPILE_ERRORS:
        raise
    except Exception as e:  # compilation errors come in many types
        first = str(e).splitlines()[0] if str(e) else ""
        if not fall_back_to_eager(run.model, f"{type(e).__name__}: {first}"):
            raise
    _set_rng_state(run, rng)
    run.model.zero_grad(set_to_none=True)
    return _update(run, batch, group)


def _rng_state(run: Run) -> list:
    """The random state a step draws from: the trainer's CPU generators, torch's global
    one (dropout on the CPU) and the training GPU's."""
    states = [g.get_state() for g in run.gens.values()]
    if run.dev.type == "cuda":
        states.append(torch.cuda.get_rng_state(run.dev))
    return states


def _set_rng_state(run: Run, states: list) -> None:
    for g, s in zip(run.gens.values(), states):
        g.set_state(s)
    if run.dev.type == "cuda":
        torch.cuda.set_rng_state(states[-1], run.dev)


def _update(run: Run, batch: torch.Tensor, group: str) -> torch.Tensor:
    """One update of the optimizer `group`: learning rate of the schedule, forward,
    backward (scaled with fp16), clipping, step, weight average; the loss, a 0-dim
    tensor on the device (reading it would make the host wait for the GPU at every
    step: `_read_losses` reads them every log_every steps)."""
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
    return loss.detach()


def _count(run: Run, loss: torch.Tensor) -> None:
    """The counters and the clock after a step; its loss waits, on the device, to be
    read. Under torchrun the loss is the mean over the ranks (reduced on the device:
    every rank counts every step), so the log and the non-finite check are the run's."""
    if run.ddp.world > 1:
        loss = mean_over_ranks(loss, run.ddp.world)
    st = run.state
    st.step += 1
    st.phase_step += 1
    st.elapsed_s = time.perf_counter() - run.start
    groups = run.phase.groups  # the group of this step: the one before run.group
    run.pending.append((loss, st.step, st.phase_step, groups[(st.phase_step - 1) % len(groups)]))


def _read_losses(run: Run, bar: tqdm | None = None) -> None:
    """Read the losses of the steps since the last read (one copy from the device) and
    go through them in order as each step used to: a non-finite loss stops the run
    (naming its step); the last loss and the loss smoothed within the phase."""
    if not run.pending:
        return
    values = torch.stack([loss.float() for loss, *_ in run.pending]).cpu().tolist()
    st = run.state
    for value, (_, step, phase_step, group) in zip(values, run.pending):
        if not math.isfinite(value):
            run.pending.clear()
            raise FloatingPointError(
                f"training loss ({group}) became {value} at step {step}; "
                "lower train.lr or use train.amp=none"
            )
        st.last_train_loss = value
        run.loss_ema = (
            value if run.loss_ema is None or phase_step == 1 else 0.95 * run.loss_ema + 0.05 * value
        )
    run.pending.clear()
    st.smoothed_train_loss = run.loss_ema
    if bar is not None:
        bar.set_postfix(phase=run.phase.name, loss=f"{run.loss_ema:.4f}")


def _log_train(run: Run) -> None:
    """A training row of log.csv, with the speed since the previous one."""
    st, (t0, step0), now = run.state, run.window, time.perf_counter()
    run.log.train(
        st.step,
        st.epoch,
        run.phase.name,
        st.elapsed_s,
        run.loss_ema,
        run.lr_now,
        (st.step - step0) / max(now - t0, 1e-9),
    )
    run.window = (now, st.step)


def _enter_phase(run: Run, phase: int) -> None:
    """Start phase `phase` (the model freezes what it keeps fixed); the best weights are
    chosen within the last phase."""
    st = run.state
    st.phase, st.phase_step = phase, 0
    st.best_val_loss = math.inf
    run.model.enter_phase(run.model.phases[phase])


def _validate(run: Run) -> None:
    """The validation loss of the (averaged) weights, each rank computing its share; the
    lowest so far is written as best.safetensors (by rank 0), and logged."""
    st = run.state
    with swapped_in(run.model, run.ema):
        v = validation_loss(run.model, run.data.val, run.cfg, run.dev, run.ddp)
        if v < st.best_val_loss:
            st.best_val_loss = v
            if run.ddp.main:
                save_weights(
                    run.model, run.run_dir / "best.safetensors", {**run.extra(), "val_loss": v}
                )
    run.log.validation(st.step, st.epoch, run.phase.name, st.elapsed_s, v, run.lr_now)


def _checkpoint(run: Run) -> None:
    """last.state.safetensors (all a resumed run needs, one atomic file) and
    last.safetensors (the weights for users)."""
    run.last_checkpoint = time.perf_counter()
    run.checkpoint_step = run.state.step
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
    _read_losses(run)
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
        if run.checkpoint_step != st.step:  # the loop's last epoch end wrote it already
            _checkpoint(run)
        (run.run_dir / "model_card.md").write_text(model_card(cfg, run.extra()))
        # the mark of a finished training (the benchmark reads it): whole or absent
        write_text_atomic(
            run.run_dir / "train_summary.json", json.dumps(_finite(summary), indent=2)
        )
        plot_progress(run.run_dir)
    run.log.close()
    # leave together: a rank that tears its process group down while another still has a
    # collective in flight aborts the other (gloo: "terminate called without an active
    # exception", seen under load)
    barrier(run.ddp)
    leave_distributed(run.ddp)
    return summary


# ------------------------------------------------------------------ setup


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
    per_rank: int  # batch size of each rank
    total_steps: int  # the step budget: train.max_steps, or train.epochs epochs
    start: float = 0.0  # perf_counter() when the run (its first part, if resumed) began
    loss_ema: float | None = None  # the training loss, smoothed within the phase
    # the averaged weights (train.ema_decay > 0): a float copy of every floating-point
    # entry of the model's state dict
    ema: dict[str, torch.Tensor] | None = None
    lr_now: float = 0.0  # train.lr times the schedule's factor at the last step
    window: tuple[float, int] = (0.0, 0)  # time and step of the last training row
    # the losses of the steps not yet read from the device: (loss, step, phase step, group)
    pending: list[tuple[torch.Tensor, int, int, str]] = field(default_factory=list)
    epoch_start_step: int = 0  # the step count when the current epoch began
    last_checkpoint: float = 0.0  # perf_counter() of the last checkpoint (or the start)
    # the step the checkpoint on disk holds (-1: none of this run): the final one is
    # written once (at the paper scale, 1.6 GB)
    checkpoint_step: int = -1

    @property
    def phase(self) -> Phase:
        return self.model.phases[self.state.phase]

    @property
    def last_phase(self) -> bool:
        return self.state.phase == len(self.model.phases) - 1

    @property
    def group(self) -> str:
        """The optimizer group of the next step: the phase's groups, one step each."""
        groups = self.phase.groups
        return groups[self.state.phase_step % len(groups)]

    @property
    def validates(self) -> bool:
        """Validation runs with validation data, in the last phase, on every rank (each
        its share of the batches; the ranks sum them)."""
        return self.data.val is not None and self.last_phase

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


def _setup(cfg: Config, data: TrainingData, run_dir: Path, device: str, resume: bool) -> Run:
    if cfg.model in MODELS and not MODELS[cfg.model].trainable:
        raise ValueError(f"model {cfg.model!r} has nothing to train")
    if data.landmarks and not cfg.data.landmarks:  # saved with the model (config.yaml)
        cfg = replace(cfg, data=replace(cfg.data, landmarks=data.landmarks))
    if data.record.scans and not cfg.data.trained_on.scans:  # what it is trained on
        cfg = replace(cfg, data=replace(cfg.data, trained_on=data.record))
    # checked on every rank before joining the group: a rank that failed alone would
    # leave the others waiting in the process group's set-up
    if resume:
        _check_same_config(run_dir, cfg)
    check_global_batch(cfg.train.batch_size, world_size())
    ddp = setup_distributed(device)
    dev = resolve_device(device, ddp.local_rank, distributed=ddp.world > 1)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(dev)
    check_training_memory(
        model.train(), cfg, dev, max(1, cfg.train.batch_size // ddp.world), ddp.world
    )
    if ddp.main:  # the folder is written once the run can start
        record_outputs(run_dir, "train", TRAIN_OUTPUTS)  # the output rule (outputs.py)
        clean_stale(run_dir)  # checkpoint temporaries of a killed run (outputs.py)
        if not resume:
            clear_run(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    speed = speed_up(model, dev, cfg.train.channels_last, cfg.train.compile, training=True)
    if ddp.main:
        write_text_atomic(  # read by --resume: whole or absent
            run_dir / "run.json",
            json.dumps({**data.sources, "version": __version__, "speed": speed}, indent=2),
        )
    optimizers = build_optimizers(model, cfg)
    ema = init_ema(model) if cfg.train.ema_decay > 0 else None
    gens = {
        "data": torch.Generator().manual_seed(cfg.train.seed),
        "noise": noise_generator(cfg, ddp.rank),
        "global": torch.default_generator,
    }
    scaler = grad_scaler(dev) if cfg.train.amp == "fp16" and dev.type == "cuda" else None
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
    per_rank = cfg.train.batch_size // ddp.world  # the global batch is train.batch_size
    per_epoch = steps_per_epoch(data.train, model, cfg, per_rank, ddp.world)
    total = cfg.train.max_steps or cfg.train.epoch_limit * per_epoch
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
        window=(time.perf_counter(), state.step),
        epoch_start_step=state.step,
        last_checkpoint=time.perf_counter(),
        checkpoint_step=state.step if resume else -1,
    )
    run.start = time.perf_counter() - state.elapsed_s
    if state.smoothed_train_loss is not None:  # a resumed run: its log goes on as it was
        run.loss_ema = state.smoothed_train_loss
    return run


def _progress_bar(run: Run, progress: bool) -> tqdm:
    t = run.cfg.train
    return tqdm(
        total=None if t.max_minutes and not t.max_steps else run.total_steps,
        initial=min(run.state.step, run.total_steps),
        desc=f"training {run.cfg.name}"
        + (f" ({t.max_minutes:g} min budget)" if t.max_minutes else ""),
        unit="step",
        disable=not (progress and run.ddp.main),
        dynamic_ncols=True,
    )


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


# ------------------------------------------------------------------ validation


@torch.no_grad()
def validation_loss(
    model: AnomalyModel,
    val: SliceSet,
    cfg: Config,
    device: torch.device,
    ddp: Distributed | None = None,
    slices_per_volume: int = 4,
) -> float:
    """Mean validation loss over fixed draws: the same slices (or volumes) and random
    inputs (t, noise, patches) every call. Under torchrun (`ddp`, called on every rank)
    each rank computes every world-th batch and the sums are added over the ranks: no
    rank waits for another to validate alone (a first, compiled validation can take
    longer than a collective's timeout). The draws are those of one process: the
    draws of each rank come from the same seeded generator through its own batches, so
    they too are the same at every validation (one process: exactly as before)."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.train.seed + 7919)
    if model.input_kind == "volumes":
        batches = val.volume_batches(list(range(len(val))), cfg.train.batch_size)
    else:
        pairs = [p for _ in range(slices_per_volume) for p in val.epoch_indices(g)]
        batches = val.batches(pairs, cfg.train.batch_size)
    rank, world = (ddp.rank, ddp.world) if ddp is not None else (0, 1)
    losses: list[tuple[torch.Tensor, int]] = []
    for i, batch in enumerate(batches):
        if i % world != rank:
            continue
        with autocast_context(device, cfg.train.amp):
            loss = model.validation_loss(to_device(batch, device), g)
        losses.append((loss, len(batch)))
    model.train()
    values = torch.stack([v.float() for v, _ in losses]).cpu().tolist() if losses else []
    total, n = 0.0, 0
    for value, size in zip(values, (size for _, size in losses)):
        total += value * size
        n += size
    if world > 1:
        total, n = sum_over_ranks([total, float(n)], device)
    return total / max(n, 1)


# ------------------------------------------------------------------ run folders


def _finite(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return None if isinstance(v, float) and not math.isfinite(v) else v


RUN_FILES = (
    "best.safetensors",
    "last.safetensors",
    "last.state.safetensors",
    "train_summary.json",
    "model_card.md",
    "progress.png",
    "log.csv",
    "run.json",
)


TRAIN_OUTPUTS = ("config.yaml", *RUN_FILES, "tb/")  # what train writes in a run folder


def clear_run(run_dir: Path) -> None:
    """Remove the files of an earlier run in `run_dir` (train --overwrite), checkpoints
    first, before the new config.yaml is written: a run killed at any moment after this
    never leaves the new config beside the old run's weights."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)  # TensorBoard events of the earlier run


def _check_same_config(run_dir: Path, cfg: Config) -> None:
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    old = load_saved_config(saved)
    # the record of the training data is measured from the data, as the landmarks are: a
    # run started before the record gains one, and a given config without one (a preset,
    # resumed) takes the run's
    if not old.data.trained_on.scans or not cfg.data.trained_on.scans:
        cfg = replace(cfg, data=replace(cfg.data, trained_on=old.data.trained_on))
    # compared as saved and read back (an old "no epoch limit" of 100000 reads as null)
    if to_dict(old) != to_dict(from_dict(to_dict(cfg))):
        raise CheckpointError(f"cannot resume: the config in {saved} differs from the one given")


def read_run_sources(run_dir: str | Path) -> dict[str, Any]:
    """Where a run's data came from (run.json), so that --resume needs no data flags."""
    p = Path(run_dir) / "run.json"
    return json.loads(p.read_text()) if p.exists() else {}


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_saved_config(path)


# ------------------------------------------------------------------ timing


def time_training_steps(
    cfg: Config, data: TrainingData, device: str = "auto", steps: int = 3, warmup: int = 1
) -> float:
    """Seconds per training step of `cfg` on `device`: the loop's own step (`_step`:
    schedule, forward, backward, update, EMA) on batches of `data`, `warmup` steps
    untimed (compilation, caches), then the mean of `steps` timed ones (the benchmark's
    time estimates, benchmark/estimate.py). Only a temporary run folder is written."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="maediff-time-") as tmp:
        run = _setup(cfg, data, Path(tmp), device, resume=False)
        try:
            run.model.train()
            run.model.enter_phase(run.phase)
            batches = _epoch(run)

            def one() -> torch.Tensor:
                nonlocal batches
                try:
                    batch, _ = next(batches)
                except StopIteration:  # a small data set: the next epoch
                    batches = _epoch(run)
                    batch, _ = next(batches)
                loss = _step(run, to_device(batch, run.dev), run.group)
                _count(run, loss)
                return loss

            for _ in range(warmup):
                float(one())  # read: the device has finished
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = one()
            float(loss)
            return (time.perf_counter() - t0) / steps
        finally:
            run.log.close()
            leave_distributed(run.ddp)


__all__ = [
    "Run",
    "Stop",
    "build_optimizers",
    "init_ema",
    "load_run_config",
    "read_run_sources",
    "swapped_in",
    "time_training_steps",
    "train",
    "update_ema",
    "validation_loss",
]
