import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from maediff.config import apply_overrides, get_preset, load_config
from maediff.device import resolve_device
from maediff.training.data import prepare_training_data
from maediff.training.trainer import train
from maediff.weights import read_checkpoint

TINY = ["train.batch_size=4", "train.checkpoint_every=1"]


def _weights(path):
    return read_checkpoint(path)[1]


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.slow
def test_training_writes_a_complete_run_folder(tiny_bench, tmp_path):
    cfg = apply_overrides(get_preset("tiny"), TINY + ["train.epochs=4"])
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    summary = train(cfg, data, tmp_path / "run", device="cpu", progress=False, log_every=1)
    per_epoch = -(-len(data.train) // 4)  # one slice per volume, batch 4
    assert summary["steps"] == 4 * per_epoch and summary["epochs"] == 4
    for f in (
        "config.yaml",
        "best.safetensors",
        "last.safetensors",
        "last.state.safetensors",
        "log.csv",
        "model_card.md",
        "train_summary.json",
        "progress.png",
    ):
        assert (tmp_path / "run" / f).exists(), f
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch") and any(
        line.split(",")[4] for line in log[1:]
    )  # validation rows
    assert summary["best_val_loss"] is not None
    # the histogram landmarks of the training volumes travel with the model
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.landmarks == data.landmarks and len(data.landmarks) == 11
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["speed"] == [
        "channels_last off (auto: cpu, training)",
        "compile off (auto: cpu)",
    ]


@pytest.mark.slow
def test_standardised_training_volumes_sit_on_the_landmarks(tiny_bench):
    cfg = replace(get_preset("tiny"), data=replace(get_preset("tiny").data, standardise="nyul"))
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    raw = prepare_training_data(get_preset("tiny"), tiny_bench, progress=False)
    assert data.landmarks == raw.landmarks
    assert not torch.equal(data.train.images[0], raw.train.images[0])


def _cli_train(run, data, epochs, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "maediff",
        "train",
        "--data",
        str(data),
        "--run-dir",
        str(run),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "-q",
    ]
    for o in TINY + [f"train.epochs={epochs}", "train.seed=3"]:
        cmd += ["--set", o]
    return cmd + list(extra)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_weights(tiny_bench, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs = 60
    # uninterrupted reference
    ref = tmp_path / "ref"
    subprocess.run(_cli_train(ref, tiny_bench, epochs), check=True, env=env, timeout=300)
    # interrupted: kill -9 as soon as a few epochs are checkpointed
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli_train(run, tiny_bench, epochs), env=env)
    state = run / "last.state.safetensors"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            shutil.copy(state, tmp_path / "probe.safetensors")
            from safetensors import safe_open

            with safe_open(str(tmp_path / "probe.safetensors"), "pt") as f:
                import json

                killed_at = json.loads(f.metadata()["state"])["epoch"]
            if killed_at >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert 3 <= killed_at < epochs
    subprocess.run(
        _cli_train(run, tiny_bench, epochs, ["--resume"]), check=True, env=env, timeout=300
    )
    a, b = _weights(ref / "last.safetensors"), _weights(run / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (run / "log.csv").read_text().count("\n") == (ref / "log.csv").read_text().count("\n")


@pytest.mark.slow
def test_resume_refuses_a_mismatched_or_missing_state(tiny_bench, tmp_path):
    from maediff.weights import CheckpointError

    cfg = apply_overrides(get_preset("tiny"), TINY + ["train.epochs=1"])
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    with pytest.raises(CheckpointError, match="no last.state.safetensors"):
        train(cfg, data, tmp_path / "empty", device="cpu", resume=True, progress=False)
    train(cfg, data, tmp_path / "run", device="cpu", progress=False)
    other = apply_overrides(cfg, ["train.lr=0.5"])
    with pytest.raises(CheckpointError, match="differs"):
        train(other, data, tmp_path / "run", device="cpu", resume=True, progress=False)


@pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tiny_bench, tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "maediff"] + _cli_train(
        run, tiny_bench, 3
    )[3:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 3
    # 4 training volumes over 2 ranks, 2 samples per rank and step: 1 step per epoch
    assert summary["steps"] == 3
    assert (run / "best.safetensors").exists()


def _lr_by_hand(step: int, total: int, lr: float, warmup: int, floor: float) -> float:
    """Step `step` (1-based) of `total`: warm-up over `warmup` steps, cosine to lr * floor."""
    progress = (step - 1) / total  # budget used when the step starts
    cos = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * cos * min(1.0, step / warmup)


@pytest.mark.slow
def test_warmup_and_cosine_schedule_by_hand(tiny_bench, tmp_path):
    import csv

    sched = ["train.schedule=cosine", "train.warmup_steps=3", "train.min_lr_ratio=0.1"]
    cfg = apply_overrides(
        get_preset("tiny"), TINY + sched + ["train.max_steps=10", "train.epochs=1000"]
    )
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    train(cfg, data, tmp_path / "run", device="cpu", progress=False, log_every=1)
    rows = [r for r in csv.DictReader((tmp_path / "run" / "log.csv").open()) if r["train_loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    for r in rows:
        want = _lr_by_hand(int(r["step"]), 10, cfg.train.lr, 3, 0.1)
        assert float(r["lr"]) == pytest.approx(want, rel=1e-5), r["step"]
    assert float(rows[-1]["lr"]) < 0.15 * cfg.train.lr < float(rows[3]["lr"])


def test_weight_average_by_hand():
    from maediff.training.trainer import init_ema, swapped_in, update_ema

    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
        net.bias.fill_(0.0)
    ema = init_ema(net)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 6.0]]))
        net.bias.fill_(1.0)
    update_ema(ema, net, decay=0.99, n=0)  # ramp: d = min(0.99, 1 / 10) = 0.1
    assert torch.allclose(ema["weight"], torch.tensor([[0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * 6]]))
    update_ema(ema, net, decay=0.5, n=90)  # d = min(0.5, 91 / 100) = 0.5
    assert torch.allclose(ema["weight"], torch.tensor([[0.5 * 2.8 + 0.5 * 3, 0.5 * 5.6 + 0.5 * 6]]))
    assert torch.allclose(ema["bias"], torch.tensor([0.5 * 0.9 + 0.5 * 1.0]))
    with swapped_in(net, ema):
        assert torch.allclose(net.weight, ema["weight"])
    assert torch.equal(net.weight, torch.tensor([[3.0, 6.0]]))  # own weights back


@pytest.mark.slow
def test_resume_with_schedule_and_weight_average_is_exact(tiny_bench, tmp_path, monkeypatch):
    """Cosine schedule + EMA: a run interrupted after a checkpoint and resumed ends with
    the same averaged weights (last.safetensors) as an uninterrupted one."""
    import maediff.training.trainer as trainer

    extra = ["train.schedule=cosine", "train.warmup_steps=2", "train.ema_decay=0.9"]
    cfg = apply_overrides(get_preset("tiny"), TINY + extra + ["train.epochs=6"])
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    train(cfg, data, tmp_path / "ref", device="cpu", progress=False)

    real = trainer._checkpoint

    def interrupted(run):  # stop right after the checkpoint at the end of epoch 3
        real(run)
        if run.state.epoch == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, tmp_path / "run", device="cpu", progress=False)
    monkeypatch.setattr(trainer, "_checkpoint", real)
    train(cfg, data, tmp_path / "run", device="cpu", resume=True, progress=False)
    a, b = (
        _weights(tmp_path / "ref" / "last.safetensors"),
        _weights(tmp_path / "run" / "last.safetensors"),
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the saved weights are the average, not the raw weights of the last step
    state = read_state_tensors(tmp_path / "ref" / "last.state.safetensors")
    raw = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    assert any(not torch.equal(raw[k], a[k]) for k in a if a[k].is_floating_point())
    assert all(torch.equal(state[f"ema.{k}"], a[k]) for k in a if a[k].is_floating_point())


def read_state_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))
