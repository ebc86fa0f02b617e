"""The CUDA path itself (issues 19 and 26): every model of the registry trains a step
and reconstructs on a GPU at the tiny scale, in fp32 and bf16, eager and compiled, its
reconstruction staying on the GPU and its compiled networks compiled (not fallen back);
through `load_model` (the path users run) compiled and bf16 reconstructions agree with
eager fp32 within a tolerance; a checkpoint written on the GPU gives the CPU's maps;
AnoDDPM's iterative sampling, evaluate, detect and the probe run there; DDP takes its
steps with two ranks (NCCL on two GPUs, gloo on one) and keeps their weights equal.

Marked `gpu` and skipped without CUDA: `python -m pytest -q -m gpu` on a GPU machine
(the compiled cases are also `slow`: one compilation per model and autocast);
`bash benchmarks/gpu_check.sh` runs the fast ones, the paper-scale end-to-end case
(benchmarks/gpu_end_to_end.py) and the benchmark in about 10 minutes on one GPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from maediff.config import apply_overrides, get_preset
from maediff.device import cuda_bf16_native, full_fp32, speed_up
from maediff.diffusion.noise import NoiseSampler
from maediff.models import MODELS, build_model
from maediff.pipeline.detect import reconstruct_volume
from maediff.training import trainer
from maediff.training.data import prepare_training_data
from maediff.training.distributed import wrap_distributed
from maediff.weights import load_model, save_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[1]
DEV = torch.device("cuda", 0)
ALL = sorted(MODELS)


def _preset(model: str, *overrides: str):
    return apply_overrides(get_preset(f"{model}-tiny"), ["train.batch_size=4", *overrides])


def _batch(model, cfg, gen: torch.Generator) -> torch.Tensor:
    H = cfg.geometry.image_size
    if model.input_kind == "volumes":
        return torch.rand(2, cfg.data.volume_shape[2], 1, H, H, generator=gen)
    return torch.rand(cfg.train.batch_size, 1, H, H, generator=gen)


def _draw_zero_layers(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p.device))


def _no_compile_fallback(caught) -> None:
    failed = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert not failed, failed


def _all_compiled(model) -> None:
    """Every compile target ran compiled (compilation happened, nothing fell back)."""
    states = [getattr(m, "compile_state", None) for m in model.compile_targets()]
    assert states and all(s is not None and s.compiled for s in states), states


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"]
)
@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("name", ALL)
def test_every_model_trains_and_reconstructs_on_cuda(name, amp, compiled):
    if amp == "bf16" and not cuda_bf16_native(DEV):
        pytest.skip("this GPU has no native bf16")
    torch._dynamo.reset()
    cfg = _preset(name)
    torch.manual_seed(0)
    model = build_model(cfg).to(DEV)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        speed_up(model, DEV, "auto", "on" if compiled else "off", training=True)
        if MODELS[name].trainable:
            opts = trainer.build_optimizers(model, cfg)
            model.train()
            for phase in model.phases:  # every group of every phase: f-AnoGAN's four
                model.enter_phase(phase)
                for group in dict.fromkeys(phase.groups):
                    model.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", torch.bfloat16, enabled=amp == "bf16"):
                        loss = model(_batch(model, cfg, gen).to(DEV), gen, group=group)
                    loss.backward()
                    opts[group].step()
                    assert torch.isfinite(loss.detach()).item(), (name, group)
        model.eval()
        H = cfg.geometry.image_size
        x = torch.rand(cfg.data.volume_shape[2], 1, H, H, generator=gen)
        rec = model.reconstruct(x, torch.Generator().manual_seed(0), amp=amp)
        torch.cuda.synchronize()
    _no_compile_fallback(caught)
    if compiled:
        _all_compiled(model)
    assert rec.shape == x.shape and rec.device.type == "cuda"  # it stays on the GPU
    assert torch.isfinite(rec).all()  # the model's output as it is (inference.clamp off)
    model.cfg = replace(cfg, inference=replace(cfg.inference, clamp=True))
    clamped = model.reconstruct(x, torch.Generator().manual_seed(0), amp=amp)
    assert clamped.min() >= 0 and clamped.max() <= 1


def _saved_drawn_model(name: str, path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(get_preset(f"{name}-tiny"))
    _draw_zero_layers(model)
    return save_weights(model, path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_load_model_compiled_and_bf16_reconstructions_agree_with_eager_fp32(name, tmp_path):
    """The path users run: load_model applies the inference speed settings. Compiled
    fp32 within 1e-2 of eager fp32 (both may use TF32); bf16's anomaly maps against
    those of true fp32 (TF32 off) within bench_gpu's tolerance (mean and 99.9th
    percentile, images in [0, 1]); the compiled model compiled."""
    torch._dynamo.reset()
    path = _saved_drawn_model(name, tmp_path / "m.safetensors")
    eager = load_model(path, DEV, ["inference.compile=off"])
    compiled = load_model(path, DEV, ["inference.compile=on"])
    H = eager.cfg.geometry.image_size
    x = torch.rand(
        eager.cfg.data.volume_shape[2], 1, H, H, generator=torch.Generator().manual_seed(1)
    )
    noise = eager.noise(x.shape[0], torch.Generator().manual_seed(2)) if eager.draws_noise else None

    def rec(model, amp):
        g = torch.Generator().manual_seed(3)
        out = model.reconstruct(x, g, noise=noise, amp=amp)
        assert out.device.type == "cuda"
        return out.float().cpu()

    reference = rec(eager, "none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        got = rec(compiled, "none")
    _no_compile_fallback(caught)
    _all_compiled(compiled)
    assert (got - reference).abs().max() <= 1e-2
    if cuda_bf16_native(DEV):
        with full_fp32():
            exact = rec(eager, "none")
        d = ((rec(eager, "bf16") - x).abs() - (exact - x).abs()).abs().flatten().double()
        assert d.mean() <= 2e-3 and torch.quantile(d, 0.999) <= 2e-2, (d.mean(), d.max())


def test_anoddpm_iterative_sampling_with_cpu_noise_on_cuda():
    """Given CPU noise was indexed with the GPU's brain-slice mask (mixed devices)."""
    cfg = apply_overrides(get_preset("anoddpm-tiny"), ["diffusion.sample_steps=3"])
    torch.manual_seed(0)
    model = build_model(cfg).to(DEV).eval()
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    brain = torch.zeros_like(x)
    brain[1:3, :, 8:24, 8:24] = 1
    noise = model.noise(4, torch.Generator().manual_seed(2))  # on the CPU
    rec = model.reconstruct(x, torch.Generator().manual_seed(3), noise=noise, brain_mask=brain)
    assert rec.device.type == "cuda" and torch.isfinite(rec).all()
    assert torch.equal(rec[0].cpu(), x[0])  # no brain: the input


@pytest.mark.slow
def test_the_probe_on_a_compiled_model_on_cuda(tmp_path):
    """The MAE branch is read without hooks, which a compiled forward skips."""
    from maediff.benchmark.probe import mae_input_dependence, patch_probe

    torch._dynamo.reset()
    path = _saved_drawn_model("maediff", tmp_path / "m.safetensors")
    slices = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    brain = torch.ones_like(slices, dtype=torch.bool)
    eager = load_model(path, DEV, ["inference.compile=off"])
    compiled = load_model(path, DEV, ["inference.compile=on"])
    compiled.denoise(  # a graph compiled before the probe, at the probe's batch
        slices.to(DEV) * 2 - 1,
        torch.full((4,), 500, device=DEV),
        torch.zeros(4, dtype=torch.long, device=DEV),
        slices.to(DEV) * 2 - 1,
    )
    a, b = mae_input_dependence(eager, slices), mae_input_dependence(compiled, slices)
    assert b["input_share"] == pytest.approx(a["input_share"], rel=1e-2, abs=1e-4)
    assert patch_probe(compiled, slices, brain)["l1"] == pytest.approx(
        patch_probe(eager, slices, brain)["l1"], rel=1e-2
    )


@pytest.mark.slow
def test_evaluate_and_detect_on_cuda(tiny_bench, tmp_path):
    from maediff.data.splits import read_pddpm_split
    from maediff.names import HEALTHY
    from maediff.pipeline.detect import detect_files
    from maediff.pipeline.evaluate import evaluate_model

    path = _saved_drawn_model("maediff", tmp_path / "m.safetensors")
    model = load_model(path, DEV)
    with pytest.raises(ValueError, match="use --workers 0"):  # no forked CUDA workers
        evaluate_model(model, tiny_bench, tmp_path / "refused", max_volumes=1, workers=2)
    summary = evaluate_model(
        model, tiny_bench, tmp_path / "eval", max_volumes=1, progress=False, figures=False
    )
    assert summary.scoring.workers == 0 and (tmp_path / "eval" / "summary.json").exists()
    subjects = read_pddpm_split(tiny_bench, HEALTHY, "test")[:1]
    report = detect_files(subjects, tmp_path / "maps", model, progress=False)
    assert not report.failed and report.written == [subjects[0].name]


def test_reconstruct_volume_on_cuda_at_a_smaller_model_size():
    """The model's slices (32) smaller than the volume's (64): the residual of a CUDA
    reconstruction is taken with the CPU input (the defect: mixed devices)."""
    model = build_model(get_preset("maediff-tiny")).to(DEV).eval()
    image = np.random.default_rng(0).random((64, 64, 4)).astype(np.float32)
    rec = reconstruct_volume(model, image, torch.Generator().manual_seed(0))
    assert rec.shape == image.shape and np.isfinite(rec).all()


def test_noise_on_cuda_is_the_cpus():
    for cfg in (get_preset("tiny").noise, replace(get_preset("tiny").noise, bank_size=3)):
        fields = [
            NoiseSampler(cfg, (32, 32))(5, torch.Generator().manual_seed(3), device=d)
            for d in ("cpu", DEV)
        ]
        assert fields[1].device.type == "cuda"
        # no TF32 in the field (no matmul): the same up to fp32 rounding, whatever
        # speed_up set
        torch.testing.assert_close(fields[1].cpu(), fields[0], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_written_on_the_gpu_gives_the_same_maps_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model(get_preset("maediff-tiny"))
    _draw_zero_layers(model)
    model = model.to(DEV).eval()
    path = save_weights(model, tmp_path / "gpu.safetensors")
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = model.noise(4, torch.Generator().manual_seed(2))
    on_gpu = model.reconstruct(x, noise=noise, amp="none").cpu()
    cpu = load_model(path, "cpu", ["inference.compile=off"])
    on_cpu = cpu.reconstruct(x, noise=noise, amp="none")
    assert (on_gpu - x).abs().max() > 1e-3  # the maps are not trivially 0
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=2e-4)


@pytest.mark.slow
def test_training_on_cuda_checkpoints_and_resumes(tiny_bench, tmp_path):
    """The trainer end to end on the GPU: the state holds the GPU's generator, the run
    resumes, and its weights load on the CPU."""
    run = tmp_path / "run"
    cfg = _preset("maediff", "train.checkpoint_every=1", "train.epochs=1000")
    data = prepare_training_data(cfg, tiny_bench, progress=False)
    cfg = replace(cfg, train=replace(cfg.train, max_steps=4))
    trainer.train(cfg, data, run, device="cuda", progress=False)
    from safetensors import safe_open

    with safe_open(str(run / "last.state.safetensors"), framework="pt") as f:
        assert "device_rng.cuda" in f.keys()
    # resuming a finished run restores its state (the GPU's generator too) and stops
    summary = trainer.train(cfg, data, run, device="cuda", resume=True, progress=False)
    assert summary["steps"] == 4 and summary["device"] == "cuda:0"
    loaded = load_model(run, "cpu")
    assert next(loaded.parameters()).device.type == "cpu"


# ------------------------------------------------------------------ DDP with NCCL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )


def _ddp_steps_worker(rank: int, world: int, port: int, out: str, backend: str) -> None:
    """Two DDP steps per model as the trainer wraps it (SyncBatchNorm for f-AnoGAN),
    and a stop flag reduced on the GPU as the trainer's stopping rule does. With gloo
    (one GPU) both ranks share cuda:0. Writes the flag and a checksum of the weights,
    which the averaged gradients keep equal on every rank."""
    _env(rank, world, port)
    gpu = rank if backend == "nccl" else 0
    torch.cuda.set_device(gpu)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        dev = torch.device("cuda", gpu)
        for name in ("maediff", "fanogan"):
            cfg = _preset(name)
            torch.manual_seed(0)
            model = build_model(cfg).to(dev)
            opts = trainer.build_optimizers(model, cfg)
            net = wrap_distributed(model, dev, find_unused_parameters=len(opts) > 1)
            gen = torch.Generator().manual_seed(rank)
            group = model.phases[0].groups[0]
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                loss = net(_batch(model, cfg, gen).to(dev), gen, group=group)
                loss.backward()
                opts[group].step()
                assert torch.isfinite(loss.detach()).item()
            total = sum(float(p.double().sum()) for p in model.parameters())
            Path(f"{out}.{name}.{rank}").write_text(repr(total))
        flag = torch.tensor([float(rank == world - 1)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        Path(f"{out}.{rank}").write_text(str(flag.item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_ddp_takes_two_steps_and_keeps_the_ranks_equal(world, tmp_path):
    """World size 2 on one GPU too: gloo reduces CUDA tensors (NCCL needs a GPU per rank)."""
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    out = str(tmp_path / "flag")
    torch.multiprocessing.spawn(
        _ddp_steps_worker, args=(world, _free_port(), out, backend), nprocs=world
    )
    for rank in range(world):
        assert (tmp_path / f"flag.{rank}").read_text() == "1.0"
    for name in ("maediff", "fanogan"):
        sums = {(tmp_path / f"flag.{name}.{r}").read_text() for r in range(world)}
        assert len(sums) == 1, (name, sums)  # the same weights on every rank


def _ddp_train_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    """The trainer under a torchrun-like environment: f-AnoGAN through its phase change
    (the phase budget all-reduced on the GPU), every rank on cuda:RANK with NCCL."""
    _env(rank, world, port)
    cfg = _preset("fanogan", "train.max_steps=8", "train.epochs=1000", "train.compile=off")
    td = prepare_training_data(cfg, data, progress=False)
    backend = []
    real_init = dist.init_process_group

    def init(name, *args, **kwargs):
        backend.append(name)
        return real_init(name, *args, **kwargs)

    dist.init_process_group = init  # this spawned process's own module
    summary = trainer.train(cfg, td, out, device="cuda:0", progress=False)
    report = Path(out).parent / f"rank{rank}.txt"
    report.write_text(f"{summary['world_size']} {summary['device']} {backend[0]}")


@pytest.mark.slow
def test_ddp_training_on_two_gpus(tiny_bench, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = str(tmp_path / "run")
    torch.multiprocessing.spawn(
        _ddp_train_worker, args=(2, _free_port(), str(tiny_bench), out), nprocs=2
    )
    # --device cuda:0 for both ranks: each took its own GPU, with NCCL
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"2 cuda:{rank} nccl"
    assert (tmp_path / "run" / "best.safetensors").exists()


@pytest.mark.slow
def test_bench_gpu_on_cuda_at_the_tiny_scale(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cuda"]
    cmd += ["--scale", "tiny", "--steps", "5", "--compile", "off", "--json", str(tmp_path / "b")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| measurement |" in res.stdout


@pytest.mark.slow
def test_the_end_to_end_case_on_cuda_at_the_tiny_scale(tmp_path):
    """benchmarks/gpu_end_to_end.py compiled with inductor on the GPU (the check runs it
    at the paper scale): training, resume and compiled inference, every check passed."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_end_to_end.py"), "--device", "cuda"]
    cmd += ["--scale", "tiny", "--steps", "8", "--compile", "on", "--json", str(tmp_path / "e")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "e").read_text())
    assert report["inference_compiled"] and report["resumed_steps"] == 8
