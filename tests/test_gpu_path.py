"""The CUDA and DDP code paths, tested on the CPU (issue 19): each test stands in for
the GPU with something the CPU has (a tensor subclass that refuses to mix with CPU
tensors, the 'meta' device, monkeypatched device checks, gloo, torch.compile's
"aot_eager" backend) and fails on the defect it was written for."""

from __future__ import annotations

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
from maediff.config import get_preset
from maediff.device import compile_with_fallback, resolve_amp, resolve_device
from maediff.diffusion import noise as noise_module
from maediff.diffusion.noise import NoiseConfig, NoiseSampler
from maediff.models import build_model
from maediff.models.base import Phase
from maediff.models.mae import MAE
from maediff.pipeline.benchmark import process_device
from maediff.pipeline.detect import reconstruct_volume
from maediff.training.checkpoint import TrainState

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
    """Duck-typed model (see reconstruct_volume) at half the volume's slice size whose
    reconstruction, the input itself, comes back 'on the GPU'."""

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
    def emulation_counts(including_emulation: bool = True) -> bool:
        return including_emulation  # an older GPU: bf16 only emulated

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulation_counts)
    assert resolve_amp("auto", CUDA0) == "none"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_amp("auto", CUDA0) == "bf16"
    # a torch without `including_emulation`: the compute capability decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    for capability, amp in (((7, 5), "none"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert resolve_amp("auto", CUDA0) == amp
    assert resolve_amp("bf16", CUDA0) == "bf16"  # an explicit choice is kept


def test_torchrun_puts_every_rank_on_its_own_gpu_with_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("auto", "cuda", "cuda:0", "cuda:3"):
        assert trainer.distributed_backend(name) == "nccl", name
    assert trainer.distributed_backend("cpu") == "gloo"
    assert resolve_device("cuda", local_rank=1, distributed=True) == torch.device("cuda", 1)
    with pytest.warns(RuntimeWarning, match="LOCAL_RANK=1 takes cuda:1"):
        assert resolve_device("cuda:0", local_rank=1, distributed=True) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == CUDA0  # one process: as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trainer.distributed_backend("auto") == "gloo"


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
    net = trainer.wrap_distributed(model, dev, find_unused_parameters=True)
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


@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_gpu.py as CI runs it: the tiny scale, a few steps, one thread."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu"]
    cmd += ["--scale", "tiny", "--steps", "3", "--slices", "4", "--json", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu"
    assert {r["preset"] for r in report["training"]} == {"maediff-tiny", "pddpm-s16-tiny"}
    assert all(r["loss_finite"] and r["steps_per_s"] > 0 for r in report["training"])
    assert all(r["seconds_per_volume"] > 0 for r in report["reconstruct"])
    assert report["table1_gpu_hours"]["total"] > 0
    assert "| " in res.stdout  # the Markdown table
