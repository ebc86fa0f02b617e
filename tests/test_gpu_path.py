"""The CUDA and DDP code paths, tested on the CPU (issues 19 and 26): each test stands in for
the GPU with something the CPU has (a tensor subclass that refuses to mix with CPU
tensors, the 'meta' device, monkeypatched device checks, gloo, torch.compile's
"aot_eager" backend) and fails on the defect it was written for."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

import maediff.training.checkpoint as checkpoint
import maediff.training.trainer as trainer
from maediff.benchmark.orchestration import process_device
from maediff.config import get_preset
from maediff.device import (
    compile_with_fallback,
    cuda_bf16_native,
    grad_scaler,
    resolve_amp,
    resolve_device,
    speed_up,
)
from maediff.diffusion import noise as noise_module
from maediff.diffusion.noise import NoiseConfig, NoiseSampler
from maediff.models import MODELS, build_model
from maediff.models.base import Phase
from maediff.models.mae import MAE
from maediff.pipeline.detect import reconstruct_volume
from maediff.training.checkpoint import TrainState
from maediff.training.data import TrainingData
from maediff.training.distributed import Distributed, distributed_backend, wrap_distributed

ROOT = Path(__file__).resolve().parents[1]
CUDA0 = torch.device("cuda", 0)


class OnAccelerator(torch.Tensor):
    """Stands for a tensor on a GPU: arithmetic with a CPU tensor fails as CUDA's does
    ("expected all tensors to be on the same device"); `.cpu()` returns a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone()
        if any(type(a) is torch.Tensor for a in tree_leaves((args, kwargs))):
            raise RuntimeError("Expected all tensors to be on the same device (fake GPU)")
        return super().__torch_function__(func, types, args, kwargs)


class GPUModel:
    """A stand-in with what reconstruct_volume reads of an AnomalyModel, at half the
    volume's slice size, whose reconstruction, the input itself, comes back 'on the GPU'."""

    any_size = False

    any_size = False  # the model contract (models/base.py): it works at its own size

    def __init__(self, size: int):
        self.cfg = SimpleNamespace(
            geometry=SimpleNamespace(image_size=size),
            inference=SimpleNamespace(skip_empty_patches=False),
        )

    def reconstruct(self, slices, generator=None, **kw):
        return slices.clone().as_subclass(OnAccelerator)


@pytest.mark.parametrize("size", [8, 16])
def test_reconstruct_volume_takes_a_gpu_reconstruction_back_to_the_cpu(size):
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    rec = reconstruct_volume(GPUModel(size), image)
    assert isinstance(rec, np.ndarray) and rec.shape == image.shape
    if size == 16:  # the model's own size: the reconstruction itself
        np.testing.assert_allclose(rec, image, atol=1e-6)
    else:  # rec = x + upsample(rec_small - x_small) = x: the residual is 0
        np.testing.assert_allclose(rec, np.clip(image, 0, 1), atol=1e-6)


# ------------------------------------------------------------------ noise on the device

# NoiseSampler(cfg, (24, 24))(4, Generator().manual_seed(7)) before the fields were
# computed on the device: (float64 sum, field[0, 0, 3, 5], field[-1, 0, 20, 11], the
# generator's next randint(1000) draw)
NOISE_BEFORE = {
    "plain": (NoiseConfig(), -528.9398861620575, -1.0520764589309692, 0.9396990537643433, 486),
    "normalised": (NoiseConfig(normalise=True), 2.57e-05, -1.515917420387268, 0.5070812106132507, 486),
    "bank": (NoiseConfig(bank_size=3), -1463.4911897480488, -0.5476319789886475, -0.6751534938812256, 47),
    "shared": (NoiseConfig(shared=True), -1058.0602020919323, -1.0520764589309692, 0.011675313115119934, 689),
    "gaussian": (NoiseConfig(kind="gaussian"), 8.410122743080137, -0.3865777850151062, -1.5334523916244507, 992),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(NOISE_BEFORE))
def test_noise_fields_on_the_cpu_are_those_of_before(kind):
    cfg, total, a, b, nxt = NOISE_BEFORE[kind]
    g = torch.Generator().manual_seed(7)
    f = NoiseSampler(cfg, (24, 24))(4, g)
    assert f.shape == (4, 1, 24, 24)
    assert f.double().sum().item() == pytest.approx(total, rel=1e-6, abs=1e-3)
    assert f[0, 0, 3, 5].item() == pytest.approx(a, abs=1e-6)
    assert f[-1, 0, 20, 11].item() == pytest.approx(b, abs=1e-6)
    assert torch.randint(1000, (1,), generator=g).item() == nxt  # the same draws were taken


@pytest.mark.parametrize("bank", [0, 2])
def test_simplex_noise_is_computed_on_the_requested_device(bank, monkeypatch):
    """The permutations come from the CPU generator; the field is computed on the device
    ('meta' here, which would fail on any read-back), not computed on the CPU and copied."""
    seen = []
    real = noise_module.simplex_octaves

    def spy(perm, *args, **kw):
        seen.append(perm.device)
        return real(perm, *args, **kw)

    monkeypatch.setattr(noise_module, "simplex_octaves", spy)
    g = torch.Generator().manual_seed(0)
    f = NoiseSampler(NoiseConfig(bank_size=bank), (16, 16))(3, g, device="meta")
    assert f.device.type == "meta" and f.shape == (3, 1, 16, 16)
    assert seen and all(d.type == "meta" for d in seen)


# ------------------------------------------------------------------ host syncs


def test_a_maediff_training_step_reads_nothing_back_from_the_device(monkeypatch):
    """On 'meta' every read-back (int(), float(), bool() of a tensor) fails: a whole
    training step there is one without host syncs. The MAE's visible count comes from
    the geometry, never from counting the mask."""

    def no_count(visible):
        raise AssertionError("the MAE counted its visible cells")

    monkeypatch.setattr(MAE, "count_visible", staticmethod(no_count))
    model = build_model(get_preset("tiny")).to("meta")
    assert model.num_visible == 12  # 16 cells, a patch covers 2 x 2
    x = torch.rand(4, 1, 32, 32, device="meta")
    loss = model.loss(x, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.device.type == "meta" and loss.shape == ()


def test_mae_with_the_static_count_matches_the_checked_path():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    mae = MAE(cfg.mae, 32, cfg.geometry, 64)
    tokens = mae.patchify(torch.randn(2, 32, 8, 8))
    vis = torch.ones(2, 16, dtype=torch.bool)
    vis[0, :4], vis[1, -4:] = False, False
    for a, b in zip(mae.forward_encoder(tokens, vis), mae.forward_encoder(tokens, vis, 12)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="same, non-zero number"):  # user masks: checked
        mae.forward_encoder(tokens, torch.tensor([[True] * 16, [True] * 15 + [False]]))


# ------------------------------------------------------------------ torch.compile


@pytest.mark.slow  # compiles f-AnoGAN's networks (aot_eager on the CPU)
def test_fanogan_compiles_its_networks_and_the_gradient_penalty_runs():
    """Compiling the loss (the model's forward) put the penalty's double backward inside
    a compiled graph: "double backward is not supported" at the first critic step. The
    targets are the generator and the encoder; the critic stays eager."""
    torch._dynamo.reset()
    model = build_model(get_preset("fanogan-tiny"))
    targets = model.compile_targets()
    assert targets and model not in targets and model.critic not in targets
    for m in targets:
        compile_with_fallback(m, backend="aot_eager")
    g, x = torch.Generator().manual_seed(0), torch.rand(4, 1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        for group in ("critic", "generator"):  # the encoder compiles as the generator does
            model.zero_grad(set_to_none=True)
            loss = model(x, g, group=group)
            loss.backward()
            assert torch.isfinite(loss.detach())
    assert all(p.grad is not None for p in model.generator.parameters())


def test_compile_fallback_raises_out_of_memory(monkeypatch):
    def compiled_that_fails(error):
        def fn(*args, **kwargs):
            raise error

        return lambda eager, **kw: fn

    layer = torch.nn.Linear(2, 2)
    monkeypatch.setattr(torch, "compile", compiled_that_fails(torch.OutOfMemoryError("no room")))
    compile_with_fallback(layer)
    with pytest.raises(torch.OutOfMemoryError):
        layer(torch.zeros(1, 2))
    layer = torch.nn.Linear(2, 2)
    monkeypatch.setattr(torch, "compile", compiled_that_fails(RuntimeError("no compiler")))
    compile_with_fallback(layer)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert layer(torch.zeros(1, 2)).shape == (1, 2)  # a compile failure: eager


# ------------------------------------------------------------------ devices and bf16


def test_auto_amp_takes_bf16_only_where_the_gpu_computes_it(monkeypatch):
    # torch.cuda.is_bf16_supported() also counts emulated bf16: the capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    for capability, amp in (((7, 5), "none"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert resolve_amp("auto", CUDA0) == amp
    assert resolve_amp("bf16", CUDA0) == "bf16"  # an explicit choice is kept


def test_torchrun_puts_every_rank_on_its_own_gpu_with_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("auto", "cuda", "cuda:0", "cuda:3"):
        assert distributed_backend(name) == "nccl", name
    assert distributed_backend("cpu") == "gloo"
    assert resolve_device("cuda", local_rank=1, distributed=True) == torch.device("cuda", 1)
    with pytest.warns(RuntimeWarning, match="LOCAL_RANK=1 takes cuda:1"):
        assert resolve_device("cuda:0", local_rank=1, distributed=True) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == CUDA0  # one process: as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed_backend("auto") == "gloo"


class FakeDDP(torch.nn.Module):
    def __init__(self, module, device_ids=None, find_unused_parameters=False):
        super().__init__()
        self.module, self.device_ids = module, device_ids


@pytest.mark.parametrize("dev", [CUDA0, torch.device("cpu")])
def test_ddp_on_cuda_synchronises_fanogans_batchnorm(dev, monkeypatch):
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    model = build_model(get_preset("fanogan-tiny"))
    params = {id(p) for p in model.parameters()}
    keys = set(model.state_dict())
    net = wrap_distributed(model, dev, find_unused_parameters=True)
    kinds = {type(m) for m in net.module.modules()}
    if dev.type == "cuda":
        assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
        assert net.device_ids == [0]
    else:  # gloo on the CPU: SyncBatchNorm needs CUDA
        assert torch.nn.BatchNorm2d in kinds and torch.nn.SyncBatchNorm not in kinds
    assert {id(p) for p in net.module.parameters()} == params  # the optimizers' parameters
    assert set(net.module.state_dict()) == keys


# ------------------------------------------------------------------ all-reduce on the device


class Reduced(Exception):
    pass


def _recording_all_reduce(seen: list):
    def fake(t, op=None):
        seen.append(t.device)
        raise Reduced

    return fake


TWO_PHASES = (Phase("a", 0.5), Phase("b", 0.5))


def _fake_run(dev: torch.device, used: float = 0.1, phases=TWO_PHASES) -> SimpleNamespace:
    model = SimpleNamespace(phases=phases, enter_phase=lambda p: None)
    return SimpleNamespace(
        model=model,
        cfg=get_preset("tiny"),
        state=TrainState(),
        start=time.perf_counter(),
        budget_used=lambda: used,
        ddp=SimpleNamespace(world=2, rank=0, main=False),
        dev=dev,
        phase=None,
    )


def test_all_reduced_flags_live_on_the_training_device(monkeypatch):
    """NCCL reduces CUDA tensors only: the stop flag and the phase budget are created on
    run.dev ('meta' stands for the GPU), not on the CPU."""
    seen: list = []
    monkeypatch.setattr(dist, "all_reduce", _recording_all_reduce(seen))
    meta = torch.device("meta")
    with pytest.raises(Reduced):  # the end of an epoch: do the ranks stop?
        trainer._stop(_fake_run(meta, phases=(Phase("a", 1.0),)), last_batch=True)
    with pytest.raises(Reduced):  # after a step: the budget used, for the phase change
        trainer._stop(_fake_run(meta), last_batch=False)
    assert seen == [meta, meta]


def _gloo_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        run = _fake_run(torch.device("cpu"), used=0.7 if rank == 1 else 0.2)
        stop = trainer._stop(run, last_batch=False)  # rank 1 passed the phase boundary (0.5)
        advanced = stop.phase is not None
        if advanced:
            trainer._enter_phase(run, stop.phase)
        Path(f"{out}.{rank}").write_text(f"{advanced} {run.state.phase}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_the_phase_change_over_gloo(tmp_path):
    torch.multiprocessing.spawn(
        _gloo_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2
    )
    for rank in (0, 1):
        assert (tmp_path / f"out.{rank}").read_text() == "True 1"


# ------------------------------------------------------------------ checkpoints


def test_train_state_saves_and_restores_the_gpus_generator(tmp_path, monkeypatch):
    state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(checkpoint, "_model_device", lambda m: CUDA0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d=None: state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d=None: restored.append((s, d)))
    model, gens = torch.nn.Linear(2, 2), {"data": torch.Generator().manual_seed(0)}
    TrainState(step=3).save(tmp_path / "s.safetensors", model, {}, gens)
    loaded, _ = TrainState.load(tmp_path / "s.safetensors", model, {}, gens)
    assert loaded.step == 3 and len(restored) == 1
    assert torch.equal(restored[0][0], state) and restored[0][1] == CUDA0
    # on the CPU the entry is ignored: a GPU run resumes there from its CPU generators
    monkeypatch.setattr(checkpoint, "_model_device", lambda m: torch.device("cpu"))
    TrainState.load(tmp_path / "s.safetensors", model, {}, gens)
    assert len(restored) == 1


# ------------------------------------------------------------------ benchmark processes


def test_benchmark_refuses_torchrun_and_takes_the_local_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--run-index N"):
        process_device("auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device("auto") == "cuda:2" and process_device("cuda") == "cuda:2"
    assert process_device("cuda:1") == "cuda:1" and process_device("cpu") == "cpu"
    monkeypatch.delenv("LOCAL_RANK")
    assert process_device("auto") == "auto"


def _benchmark_module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _check_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU machine (no GPU named), one thread, this Python."""
    drop = ("CUDA_VISIBLE_DEVICES", "GPU_CHECK_ALLOW_CPU", "GPU_CHECK_DDP", "BENCH_GPU_FAULT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    return env


def _gpu_check(out: Path, env: dict[str, str], timeout: int = 420):
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fake_nvidia_smi(tmp_path: Path) -> str:
    """A PATH whose nvidia-smi lists a GPU, as on a machine whose torch cannot use it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-stand-in)'\n")
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_and_its_checks_can_fail(tmp_path):
    """benchmarks/gpu_check.sh as CI runs it (no CUDA: the tiny scale, one thread): the
    end-to-end case, bench_gpu.py and the torchrun case with gloo; one JSON, the table;
    then bench_gpu's checks on that report, each broken in turn."""
    out = tmp_path / "check"
    t0 = time.perf_counter()
    res = _gpu_check(out, _check_env())
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check = json.loads((out / "gpu_check.json").read_text())
    assert check["steps"] == {
        "fast GPU tests": "skipped",
        "end to end (train, resume, compiled inference)": "passed",
        "bench_gpu.py": "passed",
        "DDP: torchrun --standalone, 2 processes": "passed",
    }
    e2e = check["end_to_end"]
    assert e2e["failures"] == [] and e2e["resume_weight_difference"] == 0.0
    assert e2e["last_batch"] > 0 and e2e["validations"] and e2e["checkpoint_copied_at"] < 8
    ddp = json.loads((out / "ddp_run" / "train_summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["steps"] == 4
    report = check["bench_gpu"]
    assert report["environment"]["device"] == "cpu" and report["failures"] == []
    assert {r["preset"] for r in report["training"]} == {"maediff-tiny", "pddpm-s16-tiny"}
    assert all(r["loss_finite"] and r["steps_per_s"] > 0 for r in report["training"])
    # no TF32 on a CPU: fp32 rows say fp32; a CPU with native bf16 adds bf16 rows
    assert {r["precision"] for r in report["training"] if r["amp"] == "none"} == {"fp32"}
    assert all(r["precision"] == "bf16" for r in report["training"] if r["amp"] == "bf16")
    assert all(r["on_device"] and r["seconds_per_volume"] > 0 for r in report["reconstruct"])
    assert all(r["channels_last"]["speedup"] > 0 for r in report["reconstruct"])
    assert report["table1_gpu_hours"]["total"] > 0
    rows = {r["preset"]: r for r in check["summary"]}
    assert rows["maediff-tiny"]["forward_tflops"] > 0 and rows["maediff-tiny"]["step_s"] > 0
    assert "| preset | forward TFLOP/s (share of peak) |" in res.stdout
    print(f"gpu_check.sh on the CPU: {wall:.1f} s")
    # the checks fail on what they look for
    bench_gpu = _benchmark_module("bench_gpu")
    broken = json.loads(json.dumps(report))
    broken["training"][0].update(mode="compiled", compile_fallback=["RuntimeError: x"])
    broken["training"][1].update(mode="compiled", compile_fallback=[], compiled_calls=0)
    broken["training"][1]["loss_finite"] = False
    broken["training"].append({"preset": "maediff-tiny", "mode": "compiled", "amp": "bf16",
                               "failed": "the child process died (exit code 139)"})  # fmt: skip
    broken["reconstruct"][0]["on_device"] = False
    broken["reconstruct"][1]["bf16_vs_fp32"] = {"mean": 1e-3, "p999": 0.05, "max": 0.1}
    found = bench_gpu.failures(broken)
    for what in ("fell back to eager", "nothing ran compiled", "not finite", "left the device",
                 "exit code 139", "bf16 maps differ from true fp32's by 0.05 (p999"):  # fmt: skip
        assert any(what in f for f in found), (what, found)
    assert not any("(mean;" in f for f in found)  # the mean was within its tolerance
    assert bench_gpu.amp_name("none", tf32=True) == "tf32"


@pytest.mark.parametrize("how", ["nvidia-smi", "CUDA_VISIBLE_DEVICES"])
def test_the_gpu_check_stops_when_a_visible_gpu_is_unusable(tmp_path, how):
    """A GPU the machine shows but torch cannot use (a driver / build mismatch): the
    check ran the tiny CPU path and exited 0. Now it stops before any step, exit 2."""
    env = _check_env()
    if how == "nvidia-smi":
        env["PATH"] = _fake_nvidia_smi(tmp_path)
    else:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    res = _gpu_check(tmp_path / "out", env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "torch.cuda.is_available() is False" in res.stderr
    assert "GPU_CHECK_ALLOW_CPU=1" in res.stderr
    assert ("H100" if how == "nvidia-smi" else "CUDA_VISIBLE_DEVICES=0") in res.stderr
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_the_gpu_check_says_up_front_that_pytest_or_a_c_compiler_is_missing(tmp_path):
    """A PATH without cc, gcc or clang and a Python whose pytest does not import: both
    are named before anything runs (here the visible GPU then stops the check)."""
    fake = tmp_path / "py"
    fake.mkdir()
    (fake / "pytest.py").write_text("raise ImportError('no pytest here (stand-in)')\n")
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "ls", "grep", "mkdir", "cat"):
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (tools / tool).symlink_to(found)
    env = _check_env(
        PATH=str(tools),
        PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="0",
    )
    env.pop("CC", None)
    res = subprocess.run(
        ["/bin/bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    missing = [line for line in res.stdout.splitlines() if "missing:" in line]
    assert missing and "pytest" in missing[0] and "C compiler" in missing[0], res.stdout


@pytest.mark.slow
def test_a_crashed_bench_child_fails_the_gpu_check(tmp_path):
    """The compiled paper-scale child killed (a segmentation fault, exit 139) became a
    skipped row, and the check passed. Stand-ins: the GPU visible but unusable, the CPU
    allowed on purpose; the child crashes (BENCH_GPU_FAULT=crash)."""
    env = _check_env(
        PATH=_fake_nvidia_smi(tmp_path),
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_DDP="off",
        BENCH_GPU_FAULT="crash",
    )
    res = _gpu_check(tmp_path / "out", env)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "GPU_CHECK_ALLOW_CPU=1: going on on the CPU" in res.stdout
    check = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert check["steps"]["bench_gpu.py"] == "failed (exit 1)"
    assert check["steps"]["end to end (train, resume, compiled inference)"] == "passed"
    first = check["bench_gpu"]["training"][0]
    assert first["preset"] == "maediff-tiny" and "exit code 139" in first["failed"]
    assert "FAILED (bench_gpu.py): training maediff-tiny" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, seconds, why",
    [("oom", 120, "raised OutOfMemoryError"), ("", 0.5, "stopped after 0 s, its budget")],
)
def test_a_bench_row_out_of_memory_or_past_its_budget_fails(fault, seconds, why, monkeypatch):
    bench_gpu = _benchmark_module("bench_gpu")
    monkeypatch.setenv(bench_gpu.FAULT_ENV, fault)
    # the spawned child imports bench_gpu by name, as a script's child does from its folder
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    t0 = time.perf_counter()
    row = bench_gpu.bounded_train_row(
        seconds, preset="maediff-tiny", dev=torch.device("cpu"), amp="none", compiled=True,
        steps=1, warmup=1, seed=0,
    )  # fmt: skip
    assert why in row["failed"] and row["mode"] == "compiled" and "skipped" not in row
    assert bench_gpu.failures({"training": [row], "reconstruct": []}) == [
        f"training maediff-tiny compiled fp32: {row['failed']}"
    ]
    assert time.perf_counter() - t0 < 60  # the child was stopped, not waited for


@pytest.mark.slow
def test_the_bf16_check_compares_with_true_fp32_and_catches_a_wrong_kernel(monkeypatch):
    """The reference ran in TF32 and the tolerance was 0.1 on [0, 1] maps: only NaN or a
    gross error failed. Now the reference runs with TF32 off, and a wrong bf16 kernel
    fails: a bias of 1 % of the range (the mean), an error of 0.2 on 0.3 % of the
    pixels (the 99.9th percentile). Honest bf16 passes."""
    bench_gpu = _benchmark_module("bench_gpu")
    cpu = torch.device("cpu")
    real_build = bench_gpu.build_model
    tf32_in_reference: list[bool] = []

    def built(cfg, fault=None):
        model = real_build(cfg)
        real_denoise, real_reconstruct = model.denoise, model.reconstruct

        def denoise(x_tilde, t, k, x0):
            out = real_denoise(x_tilde, t, k, x0)
            if fault is None or not torch.is_autocast_enabled("cpu"):
                return out
            if fault == "bias":
                return out + 0.02  # 1 % of the model range [-1, 1]
            g = torch.Generator().manual_seed(int(k.sum()))
            sparse = (torch.rand(out.shape, generator=g) < 0.003).to(out.dtype)
            return out + 0.4 * sparse  # 0.2 of the image range on 0.3 % of the pixels

        def reconstruct(x, *args, amp=None, **kwargs):
            if amp == "none":
                tf32_in_reference.append(torch.backends.cuda.matmul.allow_tf32)
            return real_reconstruct(x, *args, amp=amp, **kwargs)

        model.denoise, model.reconstruct = denoise, reconstruct
        return model

    def failures_with(fault):
        monkeypatch.setattr(bench_gpu, "build_model", lambda cfg: built(cfg, fault))
        row = bench_gpu.reconstruct_row("maediff-tiny", cpu, 1, ["none", "bf16"], 1.0, 0)
        return row, bench_gpu.failures({"training": [], "reconstruct": [row]})

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as speed_up sets it on CUDA
    try:
        row, found = failures_with(None)
        assert torch.backends.cuda.matmul.allow_tf32  # restored after the reference
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert found == [] and row["bf16_vs_fp32"]["mean"] > 0  # bf16 differs, within tolerance
    # the fp32 passes timed (TF32 on, as the package runs), then the reference without
    assert all(tf32_in_reference[:-1]) and tf32_in_reference[-1] is False
    _, found = failures_with("bias")
    assert any("(mean;" in f for f in found), found
    _, found = failures_with("sparse")
    assert any("(p999;" in f for f in found) and not any("(mean;" in f for f in found), found


def _end_to_end(tmp_path, compile_mode: str, steps: int = 8):
    e2e = _benchmark_module("gpu_end_to_end")
    return e2e.end_to_end("cpu", "tiny", steps, compile_mode, tmp_path / "e2e")


@pytest.mark.slow
def test_the_end_to_end_case_fails_on_a_resume_that_loses_the_optimizer(tmp_path, monkeypatch):
    real = TrainState.load.__func__

    def forgetful(cls, path, model, optimizers, *args, **kwargs):
        out = real(cls, path, model, optimizers, *args, **kwargs)
        for opt in optimizers.values():
            opt.state.clear()  # Adam's moments lost
        return out

    monkeypatch.setattr(TrainState, "load", classmethod(forgetful))
    report = _end_to_end(tmp_path, "off")
    assert report["resume_weight_difference"] > 0
    assert any(f.startswith("resume: its weights lie") for f in report["failures"])


@pytest.mark.slow
def test_the_end_to_end_case_runs_compiled_on_the_cpu(tmp_path, monkeypatch):
    """The GPU's end-to-end path at the tiny scale with torch.compile (Dynamo's graphs,
    guards and recompilations with the "eager" backend: no kernels generated; the
    backward's own compilation is tested above): training through a partial batch,
    validation and a checkpoint, the resume (bit-identical on the CPU), and compiled
    inference through load_model against eager."""
    import maediff.device as device

    real = device.compile_with_fallback
    monkeypatch.setattr(
        device, "compile_with_fallback", lambda m, backend="inductor": real(m, "eager")
    )
    torch._dynamo.reset()
    report = _end_to_end(tmp_path, "on")
    torch._dynamo.reset()
    assert report["failures"] == [], report["failures"]
    assert report["inference_compiled"] and report["compile_fallbacks"] == []
    assert report["resumed_steps"] == 8 and report["resume_weight_difference"] == 0.0
    assert report["compiled_vs_eager"]["p999"] <= 1e-5  # fp32 on the CPU: the same maps


# ================================================================== the second reading (issue 26)


def test_compile_that_cannot_even_be_created_falls_back_to_eager(monkeypatch):
    """torch < 2.4 on Python 3.12: torch.compile(...) itself raises. Creating it outside
    the fallback killed every CUDA train/detect/evaluate at speed_up."""

    def unsupported(*args, **kwargs):
        raise RuntimeError("Python 3.12+ not yet supported for torch.compile")

    monkeypatch.setattr(torch, "compile", unsupported)
    layer = torch.nn.Linear(2, 2)
    state = compile_with_fallback(layer)  # nothing raised here
    with pytest.warns(RuntimeWarning, match="3.12"):
        out = layer(torch.ones(1, 2))
    assert out.shape == (1, 2) and state.fallback and not state.compiled
    # the eager forward from then on, without another warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layer(torch.ones(1, 2)), out)


def test_grad_scaler_on_a_torch_without_torch_amp_grad_scaler(monkeypatch):
    made = []

    class OldScaler:
        def __init__(self):
            made.append("torch.cuda.amp")

    monkeypatch.delattr(torch.amp, "GradScaler")
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", OldScaler, raising=False)
    assert isinstance(grad_scaler(CUDA0), OldScaler) and made == ["torch.cuda.amp"]


def test_passing_the_recompile_limit_warns_instead_of_running_eager_silently():
    # Dynamo's own patch: monkeypatch's undo deleted the setting, and every later
    # compilation in the process failed for want of it
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        layer = torch.nn.Linear(4, 4)
        state = compile_with_fallback(layer, backend="eager")
        layer(torch.rand(2, 4))
        with pytest.warns(RuntimeWarning, match="torch.compile failed.*recompile"):
            for n in (3, 5, 7):  # new static shapes: one recompilation each
                layer(torch.rand(n, 4))
    assert state.calls >= 1 and state.fallback is not None
    assert torch._dynamo.config.recompile_limit > 1  # restored
    torch._dynamo.reset()


def test_bf16_is_decided_by_the_device_asked_about_not_the_current_one(monkeypatch):
    caps = {0: (7, 5), 1: (9, 0)}  # cuda:0 (current) emulates bf16, cuda:1 has it

    def capability(d=None):
        return caps[0 if d is None else torch.device(d).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert cuda_bf16_native(torch.device("cuda", 1)) and not cuda_bf16_native(CUDA0)
    assert resolve_amp("auto", torch.device("cuda", 1)) == "bf16"
    assert resolve_amp("auto", CUDA0) == "none"


def test_cudnn_benchmark_only_for_training_and_channels_last_off_on_cuda():
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = flags[0].benchmark, flags[0].allow_tf32, flags[1].allow_tf32
    try:
        model = build_model(get_preset("tiny"))
        notes = speed_up(model, CUDA0, compile="off", training=True)
        assert torch.backends.cudnn.benchmark is True
        assert notes[0].startswith("channels_last off (auto")
        speed_up(model, CUDA0, compile="off", training=False)  # chunk sizes vary per volume
        assert torch.backends.cudnn.benchmark is False
        conv = model.net.input_blocks[0][0].weight
        assert conv.is_contiguous()  # NCHW: not measured on a GPU yet
    finally:
        flags[0].benchmark, flags[0].allow_tf32, flags[1].allow_tf32 = saved


# ------------------------------------------------------------------ compile targets


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_targets_are_networks_that_reconstruction_calls(name):
    """Compiling the model itself compiled its loss (draws, rolls, dropout) and never
    the reconstruction: every target is a network, and reconstruct calls each."""
    torch.manual_seed(0)
    model = build_model(get_preset(f"{name}-tiny")).eval()
    targets = model.compile_targets()
    assert model not in targets
    called: dict[int, int] = {id(m): 0 for m in targets}
    for m in targets:
        eager = m.forward

        def counted(*a, _m=m, _f=eager, **kw):
            called[id(_m)] += 1
            return _f(*a, **kw)

        m.forward = counted
    x = torch.rand(model.cfg.data.volume_shape[2], 1, 32, 32)
    model.reconstruct(x, torch.Generator().manual_seed(0))
    if name == "fanogan":  # the encoder and the generator; the critic trains only
        assert all(called.values()) and len(called) == 2
    else:
        assert all(called.values()), called


# ------------------------------------------------------------------ the probe


@pytest.mark.slow  # compiles MAEDiff (aot_eager on the CPU)
def test_mae_probe_reads_the_branch_without_hooks_a_compiled_forward_would_skip():
    """A compiled U-Net reuses its graph without a forward hook registered later (Dynamo
    does not guard on hooks): `captured[0]` raised. The stand-in forward below runs the
    network with every hook set aside, as such a graph does."""
    from maediff.benchmark.probe import mae_input_dependence

    torch.manual_seed(0)
    model = build_model(get_preset("maediff-tiny")).eval()
    slices = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = mae_input_dependence(model, slices)
    net, eager = model.net, model.net.forward

    def graph_without_hooks(*args, **kwargs):
        saved = {m: dict(m._forward_hooks) for m in net.modules()}
        for m in saved:
            m._forward_hooks.clear()
        try:
            return eager(*args, **kwargs)
        finally:
            for m, hooks in saved.items():
                m._forward_hooks.update(hooks)

    net.forward = graph_without_hooks
    got = mae_input_dependence(model, slices)
    assert got == reference and 0 < got["input_share"] < 1


# ------------------------------------------------------------------ AnoDDPM's iterative sampling


class GivenOnHost(torch.Tensor):
    """Noise a caller passes on the CPU. Indexing it with the model's mask fails as a CPU
    tensor indexed by a CUDA mask does; moved (`.to`) it is an ordinary tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            raise RuntimeError("indices should be on the same device as the indexed tensor")
        if func is torch.Tensor.to:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs)


def test_anoddpm_iterative_moves_given_noise_to_the_device_before_masking():
    from maediff.config import apply_overrides

    cfg = apply_overrides(get_preset("anoddpm-tiny"), ["diffusion.sample_steps=3"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    brain = torch.zeros_like(x)
    brain[1:3, :, 8:24, 8:24] = 1  # slices 0 and 3 hold no brain: the mask selects
    noise = model.noise(4, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    plain = model.reconstruct(x, g, noise=noise, brain_mask=brain)
    g = torch.Generator().manual_seed(3)
    given = model.reconstruct(x, g, noise=noise.as_subclass(GivenOnHost), brain_mask=brain)
    torch.testing.assert_close(given, plain, rtol=0, atol=0)
    assert torch.equal(given[0], x[0]) and not torch.equal(given[1], x[1])


# ------------------------------------------------------------------ worker processes


def test_worker_processes_are_refused_for_a_model_on_a_gpu(tmp_path):
    from maediff.pipeline.workers import ReconstructionPool, check_workers

    model = build_model(get_preset("tiny")).to("meta")  # stands for a model on a GPU
    with pytest.raises(ValueError, match="--workers 2: .* on meta; use --workers 0"):
        check_workers(model, 2)
    with pytest.raises(ValueError, match="use --workers 0"):
        ReconstructionPool(model, 2)
    check_workers(model, 0)  # in process: fine
    check_workers(build_model(get_preset("tiny")), 2)  # on the CPU: fine


# ------------------------------------------------------------------ the trainer


class _Volume:
    def __init__(self, i: int, rng: np.random.Generator):
        self.name = f"v{i}"
        self.image = rng.random((32, 32, 4)).astype(np.float32)
        self.brain_mask = np.zeros((32, 32, 4), bool)
        self.brain_mask[6:26, 6:26] = True
        self.image *= self.brain_mask


def _small_data(n_train: int = 8, n_val: int = 2) -> TrainingData:
    from maediff.data.datasets import SliceSet

    rng = np.random.default_rng(0)
    vols = [_Volume(i, rng) for i in range(n_train + n_val)]
    return TrainingData(SliceSet(vols[:n_train], 32), SliceSet(vols[n_train:], 32), "test volumes")


def _tiny_cfg(*overrides: str):
    from maediff.config import apply_overrides

    return apply_overrides(get_preset("tiny"), ["train.batch_size=4", *overrides])


def _validation_steps(run_dir: Path) -> list[int]:
    rows = (run_dir / "log.csv").read_text().splitlines()
    head = rows[0].split(",")
    col = head.index("val_loss")
    return [int(r.split(",")[0]) for r in rows[1:] if r.split(",")[col]]


def _spy(monkeypatch, name: str, record) -> None:
    real = getattr(trainer, name)

    def spied(run, *args):
        record(run)
        return real(run, *args)

    monkeypatch.setattr(trainer, name, spied)


@pytest.mark.slow
def test_validation_by_steps_and_losses_read_every_log_every_steps(tmp_path, monkeypatch):
    """2 steps per epoch, val_every_steps=3: validation at the first epoch end after
    steps 3 and 6 (4, 6); checkpoints every 1000 minutes: only at the end. The losses
    (reading one makes the host wait for the GPU) are read in one copy every log_every
    (3) steps and before a validation, not after every step."""
    written, reads = [], []
    _spy(monkeypatch, "_checkpoint", lambda run: written.append(run.state.step))
    _spy(monkeypatch, "_read_losses", lambda run: reads.append(len(run.pending)))
    cfg = _tiny_cfg(
        "train.batch_size=2", "train.max_steps=6", "train.epochs=1000",
        "train.val_every_steps=3", "train.checkpoint_every_minutes=1000",
    )  # fmt: skip
    summary = trainer.train(
        cfg, _small_data(4, 1), tmp_path / "run", device="cpu", progress=False, log_every=3
    )
    assert _validation_steps(tmp_path / "run") == [4, 6]
    assert written == [6]  # the last epoch's; the finish does not write it again (1.6 GB)
    assert [n for n in reads if n] == [3, 1, 2]
    assert math.isfinite(summary["final_train_loss"])


@pytest.mark.slow
def test_checkpoints_by_minutes(tmp_path, monkeypatch):
    written = []
    _spy(monkeypatch, "_checkpoint", lambda run: written.append(run.state.step))
    cfg = _tiny_cfg(
        "train.batch_size=2", "train.max_steps=4", "train.epochs=1000",
        "train.checkpoint_every_minutes=1e-9", "train.val_every_steps=1000",
    )  # fmt: skip
    trainer.train(cfg, _small_data(4, 1), tmp_path / "run", device="cpu", progress=False)
    assert written == [2, 4]  # due at every epoch end: its minutes have passed; once at 4


def test_the_paper_scale_validates_by_steps_and_the_small_scales_by_epochs():
    from maediff.scales import PAPER_CHECKPOINT_EVERY_MINUTES, PAPER_VAL_EVERY_STEPS

    for name in ("maediff", "pddpm-s16", "ae", "fanogan"):
        t = get_preset(name).train
        assert t.val_every_steps == PAPER_VAL_EVERY_STEPS > 0
        assert t.checkpoint_every_minutes == PAPER_CHECKPOINT_EVERY_MINUTES > 0
        for scale in ("cpu", "tiny"):  # unchanged: existing results stay as they are
            t = get_preset(f"{name}-{scale}").train
            assert (t.val_every_steps, t.checkpoint_every_minutes) == (0, 0.0)


def test_a_non_finite_loss_still_stops_the_run_naming_its_step(tmp_path, monkeypatch):
    real = MAE.forward

    def poisoned(self, *args, **kwargs):
        return real(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(MAE, "forward", poisoned)
    cfg = _tiny_cfg("train.batch_size=2", "train.max_steps=2", "train.epochs=1000")
    with pytest.raises(FloatingPointError, match="became nan at step 1"):
        trainer.train(
            cfg, _small_data(4, 1), tmp_path / "run", device="cpu", progress=False, log_every=2
        )
    assert not (tmp_path / "run" / "last.state.safetensors").exists()


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))

    def must_not_join(device):
        raise AssertionError("joined the process group before the checks")

    monkeypatch.setattr(trainer, "setup_distributed", must_not_join)


def test_every_rank_checks_the_config_before_joining_the_group(tmp_path, monkeypatch):
    """Only rank 0 compared the resumed config: it failed, and the others waited in the
    process group's set-up for ever."""
    run = tmp_path / "run"
    run.mkdir()
    from maediff.config import save_config

    save_config(_tiny_cfg("train.lr=0.5"), run / "config.yaml")
    _as_rank(monkeypatch, 1, 2)
    with pytest.raises(checkpoint.CheckpointError, match="differs"):
        trainer.train(_tiny_cfg(), _small_data(), run, device="cpu", resume=True, progress=False)


def test_a_global_batch_the_ranks_cannot_share_equally_is_refused(tmp_path, monkeypatch):
    _as_rank(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match="batch_size=4 .* divisible by the 3 torchrun"):
        trainer.train(_tiny_cfg(), _small_data(), tmp_path / "r", device="cpu", progress=False)


def test_every_rank_validates_its_share_and_the_ranks_sum(monkeypatch):
    """Rank 0 validated alone while the others waited in a barrier a first compiled
    validation could outlast. Each rank now takes every world-th batch; AE's validation
    loss draws nothing, so the ranks' sums give one process's mean."""
    cfg = apply_overrides_tiny_ae()
    torch.manual_seed(0)
    model = build_model(cfg)
    data = _small_data(n_train=2, n_val=5)
    one = trainer.validation_loss(model, data.val, cfg, torch.device("cpu"))
    shares = []
    monkeypatch.setattr(trainer, "sum_over_ranks", lambda v, dev: shares.append(v) or v)
    for rank in (0, 1):
        ddp = Distributed(rank=rank, world=2)
        trainer.validation_loss(model, data.val, cfg, torch.device("cpu"), ddp)
    (t0, n0), (t1, n1) = shares
    assert n0 > 0 and n1 > 0 and n0 + n1 == 20  # 5 volumes x 4 slices, batch 4: 3 + 2 batches
    assert (t0 + t1) / (n0 + n1) == pytest.approx(one, rel=1e-12)


def apply_overrides_tiny_ae():
    from maediff.config import apply_overrides

    return apply_overrides(get_preset("ae-tiny"), ["train.batch_size=4"])


def _gloo_train_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    cfg = _tiny_cfg("train.max_steps=4", "train.epochs=1000")
    summary = trainer.train(cfg, _small_data(8, 3), Path(out) / "run", device="cpu", progress=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_two_ranks_over_gloo_train_and_validate_together(tmp_path):
    """The trainer under torchrun's environment, two processes: each validates its
    share and both get the same validation loss; rank 0 writes the files."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_train_worker, args=(port, str(tmp_path)), nprocs=2)
    summaries = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert summaries[0]["best_val_loss"] == summaries[1]["best_val_loss"]
    assert math.isfinite(summaries[0]["best_val_loss"])
    assert (tmp_path / "run" / "best.safetensors").exists()
    assert _validation_steps(tmp_path / "run")  # logged by rank 0


def test_the_benchmark_forgets_compiled_graphs_between_runs(tmp_path, monkeypatch):
    """Table 2 runs many models in one process: without a reset, the shared forwards
    passed Dynamo's recompile limit and later models ran eager without a word."""
    from maediff.benchmark import RunSpec
    from maediff.benchmark import orchestration as benchmark

    events = []
    monkeypatch.setattr(benchmark, "reset_compiled", lambda: events.append("reset"))
    monkeypatch.setattr(
        benchmark, "execute_run", lambda plan, spec, *a: events.append(spec.model) or {}
    )
    plan = SimpleNamespace(budget=lambda: "test", scale="tiny")
    todo = [RunSpec("maediff", 0, 0), RunSpec("pddpm-s16", 0, 0)]
    benchmark._run_all(plan, todo, tmp_path, tmp_path, "cpu", False)
    assert events == ["reset", "maediff", "reset", "pddpm-s16"]


# ================================================================== the third reading (issue 40)


def test_the_paper_scale_trains_and_infers_in_bf16_on_a_gpu_that_has_it(monkeypatch):
    """The paper presets default to bf16 on CUDA GPUs with native bf16 (about 1.5-2x
    faster than TF32), fp32 elsewhere: the CPU keeps fp32 even where it has bf16, and
    the cpu and tiny scales keep their settings."""
    for name in ("maediff", "pddpm-s16", "ae", "fanogan"):
        cfg = get_preset(name)
        assert (cfg.train.amp, cfg.inference.amp) == ("cuda-bf16", "cuda-bf16"), name
        assert get_preset(f"{name}-cpu").train.amp == "auto"
        assert get_preset(f"{name}-tiny").train.amp == "none"
    cpu = getattr(torch, "cpu", None)
    monkeypatch.setattr(cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_amp("auto", torch.device("cpu")) == "bf16"
    assert resolve_amp("cuda-bf16", torch.device("cpu")) == "none"
    for capability, amp in (((7, 5), "none"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert resolve_amp("cuda-bf16", CUDA0) == amp


def test_each_rank_takes_local_rank_modulo_the_gpus_it_sees(monkeypatch):
    """srun with one GPU per task shows each task one device: LOCAL_RANK 3 -> cuda:0
    (cuda:3 does not exist there); torchrun on 4 GPUs: cuda:3."""
    from maediff.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for count, want in ((1, 0), (4, 3), (2, 1)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda c=count: c)
        assert resolve_device("auto", local_rank=3) == torch.device("cuda", want)
        assert resolve_device("cuda", local_rank=3, distributed=True) == torch.device("cuda", want)
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(i))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    ddp = distributed.setup_distributed("cuda")
    assert chosen == [0] and ddp.local_rank == 3 and ddp.world == 4


def test_the_logged_loss_under_torchrun_is_the_mean_over_the_ranks(monkeypatch):
    """Rank 0 logged its own loss; the steps' losses are now averaged over the ranks on
    the device (here the other rank's 3.0 is added by a stand-in all-reduce)."""
    from maediff.training import distributed

    def other_rank_adds(t, op=None):
        assert op == dist.ReduceOp.SUM and t.device.type == "cpu"
        t += 3.0

    monkeypatch.setattr(distributed.dist, "all_reduce", other_rank_adds)
    run = SimpleNamespace(
        ddp=Distributed(rank=0, world=2),
        state=TrainState(),
        start=time.perf_counter(),
        phase=Phase("model", 1.0),
        pending=[],
    )
    trainer._count(run, torch.tensor(1.0))
    assert run.pending[0][0].item() == pytest.approx(2.0)  # (1 + 3) / 2
    run.ddp = Distributed()
    trainer._count(run, torch.tensor(1.0))  # one process: no reduction
    assert run.pending[1][0].item() == 1.0


def _failing_backward_backend():
    """A torch.compile backend whose forward compiles and whose backward graph, compiled
    lazily at the first loss.backward() as inductor's is, fails to."""
    from torch._dynamo.backends.common import aot_autograd

    def backward_fails(gm, example_inputs):
        raise RuntimeError("backward graph failed to compile (stand-in)")

    return aot_autograd(fw_compiler=lambda gm, ex: gm, bw_compiler=backward_fails)


@pytest.mark.slow
def test_a_backward_that_fails_to_compile_falls_back_and_the_step_is_redone(tmp_path, monkeypatch):
    """The backward graph compiles at the first loss.backward(), outside the forward's
    fallback: the run crashed. Now Dynamo is reset, the networks run eager and the step
    is redone from its random state: the run's weights are an eager run's, exactly."""
    from safetensors.torch import load_file

    import maediff.device as device

    cfg = _tiny_cfg("train.batch_size=2", "train.max_steps=3", "train.epochs=1000")
    eager_cfg = _tiny_cfg(
        "train.batch_size=2", "train.max_steps=3", "train.epochs=1000", "train.compile=off"
    )
    trainer.train(eager_cfg, _small_data(4, 1), tmp_path / "eager", device="cpu", progress=False)
    torch._dynamo.reset()
    real = device.compile_with_fallback
    monkeypatch.setattr(
        device,
        "compile_with_fallback",
        lambda m, backend="inductor": real(m, backend=_failing_backward_backend()),
    )
    cfg = _tiny_cfg(
        "train.batch_size=2", "train.max_steps=3", "train.epochs=1000", "train.compile=on"
    )
    with pytest.warns(RuntimeWarning, match="forward and backward.*|backward graph failed"):
        summary = trainer.train(
            cfg, _small_data(4, 1), tmp_path / "compiled", device="cpu", progress=False
        )
    assert summary["steps"] == 3 and math.isfinite(summary["final_train_loss"])
    a = load_file(str(tmp_path / "eager" / "last.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    torch._dynamo.reset()


def test_noise_fields_take_no_matmul_that_cuda_would_run_in_tf32():
    """The octaves were summed by an einsum, a matmul: in TF32 on CUDA (speed_up turns it
    on), so the GPU's noise differed from the CPU's by about 1e-3 and a test comparing
    them could fail. Every op of a field is recorded: none is a matrix product."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Record():
        NoiseSampler(NoiseConfig(), (16, 16))(2, torch.Generator().manual_seed(0))
    assert ops and not ops & {"mm", "bmm", "addmm", "matmul", "baddbmm", "einsum"}, ops


def test_worker_processes_are_spawned_not_forked_once_cuda_is_initialised(monkeypatch):
    """CPU workers forked after this process initialised CUDA (a GPU trained here
    first) inherit a CUDA state they cannot use; they are spawned then."""
    from maediff.pipeline import workers

    methods = []
    real = workers.multiprocessing.get_context

    def recording(method=None):
        methods.append(method)
        return real(method)

    monkeypatch.setattr(workers.multiprocessing, "get_context", recording)
    model = build_model(get_preset("tiny"))
    for initialised in (False, True):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda v=initialised: v)
        workers.ReconstructionPool(model, 1).close()  # no task: no process started
    assert methods == ["fork", "spawn"]


def _host_copies(fn) -> list[str]:
    """Where fn() copies a CPU tensor to the 'meta' device (which stands for the GPU)
    other than through device.to_device, which on CUDA copies from pinned memory without
    blocking: a copy from pageable memory makes the host wait for the GPU's queue."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []
    package = f"{os.sep}maediff{os.sep}"

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if (
                func is torch.ops.aten._to_copy.default
                and src is not None
                and src.device.type == "cpu"
                and str(kwargs.get("device")) == "meta"
            ):
                frames = [f for f in traceback.extract_stack() if package in f.filename]
                if frames and not frames[-1].filename.endswith("device.py"):
                    found.append(f"{Path(frames[-1].filename).name}:{frames[-1].lineno}")
            return func(*args, **kwargs)

    with Record():
        fn()
    return found


def test_a_training_step_and_an_inference_chunk_copy_nothing_from_pageable_memory():
    """The patch corners were copied to the GPU at every inference chunk (crop): a copy
    from pageable host memory, so the host waited for the GPU each time. After a first
    call (tables copied once), a training step and a chunk's denoise and crop copy only
    through to_device."""
    model = build_model(get_preset("maediff-tiny")).to("meta")
    x = torch.rand(4, 1, 32, 32).to("meta")
    g = torch.Generator().manual_seed(0)

    def step():
        model.loss(x, g).backward()

    def chunk():
        k = torch.tensor([0, 3, 5, 8]).to("meta")
        t = torch.full((4,), 500).to("meta")
        pred = model.denoise(model.noised_input(x, x, k), t, k, x)
        model.grid.crop(pred.float(), k)

    step(), chunk()  # first calls: the schedule tables and the corners go to the device once
    assert _host_copies(step) == []
    assert _host_copies(chunk) == []


def test_table_1_gpu_hours_name_tf32_where_tf32_was_on():
    """The GPU-hours estimate assumed bf16 but labelled a TF32 row "fp32"."""
    bench_gpu = _benchmark_module("bench_gpu")
    training = [
        {"preset": "maediff", "mode": "eager", "amp": "none", "loss_finite": True,
         "steps_per_s": 4.0},
        {"preset": "maediff", "mode": "compiled", "amp": "bf16", "loss_finite": True,
         "steps_per_s": 8.0},
        {"preset": "pddpm-s16", "mode": "eager", "amp": "none", "loss_finite": True,
         "steps_per_s": 5.0},
    ]  # fmt: skip
    recon = [
        {"preset": "maediff", "fastest_amp": "bf16", "seconds_per_volume": 2.0},
        {"preset": "pddpm-s16", "fastest_amp": "none", "seconds_per_volume": 1.0},
    ]
    hours = bench_gpu.table1_hours(training, recon, "paper", tf32=True)
    assert hours["maediff"]["training"] == "compiled bf16"
    assert hours["pddpm-s16"]["training"] == "eager tf32"
    assert hours["pddpm-s16"]["reconstruct"] == "tf32"
    assert bench_gpu.table1_hours(training, recon, "paper")["pddpm-s16"]["reconstruct"] == "fp32"
    assert hours["maediff"]["train_h"] == pytest.approx(5 * 1600 * 12 / 8.0 / 3600)
