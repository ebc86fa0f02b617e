"""Devices and mixed precision: the one place that knows about CUDA, MPS and bf16.

dev = resolve_device("auto")                 # CUDA, then MPS, then CPU
with autocast_context(dev, "auto"): ...      # bf16 where the hardware has it
notes = speed_up(model, dev, channels_last="auto", compile="auto", training=False)

Speed settings (docs/method.md §Speed): each is "on", "off" or "auto", and "auto"
decides per device for a reason measured on that kind of device:
- channels_last (NHWC weights and activations): on the CPU for inference (+4 % per
  volume, measured with oneDNN) and off for training (-4 % per step, measured); off on
  CUDA until measured there: the networks are GroupNorm-heavy, and GroupNorm on NHWC
  CUDA tensors may copy to NCHW and back (benchmarks/bench_gpu.py times both layouts).
- compile (torch.compile of the networks' forward): on for CUDA; off on the CPU, where
  it took 2 minutes to compile for 5 % per pass (measured at the cpu preset). When
  compilation fails (no C++ compiler, an unsupported platform, a torch whose Dynamo
  does not support this Python, the recompile limit hit) the eager forward is used and
  a warning says why; running out of memory is not a compilation failure and is raised.
- bf16 ("auto"): on CUDA only where the GPU computes it natively (compute capability
  8.0, Ampere, and later); older GPUs emulate it, slower than fp32. "cuda-bf16" (the
  paper scale's default): the same on CUDA, fp32 everywhere else (the CPU too).
- cudnn.benchmark: on for training (fixed batch shapes: the fastest kernels are picked
  once), off for inference, where the chunk sizes vary per volume (re-tuning per size,
  and kernels chosen by timing differ between runs, so would the maps).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import SPEED_MODES


def resolve_device(
    name: str = "auto", local_rank: int = 0, distributed: bool = False
) -> torch.device:
    """ "auto" picks CUDA, then MPS, then CPU; an explicit device must be available.

    CUDA without an index takes GPU `local_cuda_index(local_rank)`. Under torchrun
    (`distributed`) every process takes its own GPU, LOCAL_RANK modulo the visible GPUs,
    whatever index was given: "cuda:0" for every rank would put them all on GPU 0 (a
    warning says so when an index conflicts). The modulo serves launchers that show
    each task only its own GPU (srun with one GPU per task: LOCAL_RANK 3, one device)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_cuda_index(local_rank))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps") from e
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' requested but MPS is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_cuda_index(local_rank))
    elif dev.type == "cuda" and distributed and dev.index != local_cuda_index(local_rank):
        index = local_cuda_index(local_rank)
        warnings.warn(
            f"device {name!r} under torchrun: process LOCAL_RANK={local_rank} takes "
            f"cuda:{index} (one GPU per process); limit the GPUs with CUDA_VISIBLE_DEVICES",
            RuntimeWarning,
            stacklevel=2,
        )
        dev = torch.device("cuda", index)
    return dev


def local_cuda_index(local_rank: int) -> int:
    """The GPU of the process with `local_rank` on its node: local_rank modulo the GPUs
    it sees. torchrun shows every process all GPUs of the node (rank 3 -> cuda:3);
    srun with --gpus-per-task=1 shows each task only its own (rank 3 -> cuda:0, the
    one there is, where cuda:3 would not exist)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return local_rank % count if count > 0 else local_rank


def cuda_bf16_native(device: torch.device | None = None) -> bool:
    """Whether the GPU `device` computes bf16 natively (compute capability >= 8.0).
    torch.cuda.is_bf16_supported() asks the current device rather than the one given,
    and by default also counts bf16 emulated in fp32 on older GPUs (slower than fp32)."""
    if torch.version.hip:  # ROCm: every architecture torch supports has bf16
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def grad_scaler(device: torch.device):
    """The fp16 loss scaler of a CUDA device: torch.amp.GradScaler (torch >= 2.3), or
    torch.cuda.amp.GradScaler on older torch, where torch.amp has none."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the CPU) on `device`. To a CUDA device it is copied from pinned memory
    without blocking the host (the copy is queued on the stream, in order with the
    kernels that read it); elsewhere it is an ordinary `.to`."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def resolve_amp(amp: str, device: torch.device) -> str:
    """ "auto": bf16 where the hardware computes it natively (CUDA GPUs of compute
    capability 8.0 and later, CPUs with AVX512-BF16 or AMX), otherwise "none";
    "cuda-bf16": "auto" on a CUDA GPU, "none" on any other device. Other values pass
    through."""
    if amp == "cuda-bf16":  # the paper scale's default: bf16 on a GPU, the CPU unchanged
        return resolve_amp("auto", device) if device.type == "cuda" else "none"
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if cuda_bf16_native(device) else "none"
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        native = any(
            getattr(cpu, f, lambda: False)()
            for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
        return "bf16" if native else "none"
    return "none"


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for "bf16" / "fp16" ("auto" resolved first); a no-op for "none"."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp={amp!r} must be 'none', 'bf16' or 'fp16'")
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def full_fp32():
    """Inside it, CUDA matmuls and convolutions compute in true fp32 (TF32 off, which
    `speed_up` switches on for speed): the reference that bf16 is compared with."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def _decide(setting: str, name: str, auto: bool, reason: str) -> tuple[bool, str]:
    if setting not in SPEED_MODES:
        raise ValueError(f"{name}={setting!r} must be one of {', '.join(SPEED_MODES)}")
    if setting == "auto":
        return auto, f"{name} {'on' if auto else 'off'} (auto: {reason})"
    return setting == "on", f"{name} {setting} (set)"


# errors of the run itself, not of compilation: raised, never a reason to run eager
NOT_COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    MemoryError,
)


def _strict_recompiles() -> contextlib.AbstractContextManager:
    """Inside it, Dynamo raises when a function passes its recompile limit instead of
    silently running it eager from then on (torch versions with the switch)."""
    config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if config is None or not hasattr(config, "fail_on_recompile_limit_hit"):
        return contextlib.nullcontext()
    return config.patch(fail_on_recompile_limit_hit=True)


@dataclass
class CompileState:
    """What became of a compiled module (`module.compile_state`): `calls` of the
    compiled forward that returned, or why it fell back to eager."""

    backend: str
    calls: int = 0
    fallback: str | None = None

    @property
    def compiled(self) -> bool:
        return self.calls > 0 and self.fallback is None


def compile_with_fallback(module: nn.Module, backend: str = "inductor") -> CompileState:
    """Replace `module.forward` by its torch.compile'd version, falling back to eager
    (once, with a warning) when compilation fails. State-dict keys are unchanged.

    The compiled function is created at the first call, inside the fallback: on a torch
    whose Dynamo does not support this Python (torch < 2.4 on Python 3.12), creating it
    raises, and the forward runs eager with a warning rather than the run dying. Passing
    Dynamo's recompile limit (many shapes, many models in one process) is a failure too,
    with its warning, not a silent switch to eager. Out of memory (and KeyboardInterrupt,
    SystemExit) propagate: the eager forward would not fit either, and a warning would
    hide why the run stopped. `backend`: torch.compile's ("aot_eager" compiles the
    graphs without generating kernels, as the tests do). Returns the module's
    `compile_state`."""
    eager = module.forward
    state = CompileState(backend)
    compiled: list = []

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if state.fallback is None:
            try:
                if not compiled:
                    compiled.append(torch.compile(eager, backend=backend))
                with _strict_recompiles():
                    out = compiled[0](*args, **kwargs)
                state.calls += 1
                return out
            except NOT_COMPILE_ERRORS:
                raise
            except Exception as e:  # compilation errors come in many types
                state.fallback = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(
                    f"torch.compile failed for {type(module).__name__} ({state.fallback}); "
                    "running the eager forward",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return eager(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    module.compile_state = state  # type: ignore[assignment]
    return state


def compile_states(model: nn.Module) -> list[CompileState]:
    """The CompileState of every network of `model` that was compiled (compile_with_fallback)."""
    targets = model.compile_targets() if hasattr(model, "compile_targets") else [model]
    return [
        m.compile_state
        for m in targets
        if isinstance(getattr(m, "compile_state", None), CompileState)
    ]


def runs_compiled(model: nn.Module) -> bool:
    """Whether a network of `model` still runs its compiled forward."""
    return any(s.fallback is None for s in compile_states(model))


def fall_back_to_eager(model: nn.Module, reason: str) -> bool:
    """Switch every compiled network of `model` that still runs compiled to its eager
    forward (with a warning naming `reason`) and forget the compiled graphs. For errors
    that surface outside the compiled forward, such as the backward graph, which
    AOTAutograd compiles at the first `loss.backward()`. Returns whether anything was
    compiled (False: the error was not compilation's, nothing to fall back from)."""
    active = [s for s in compile_states(model) if s.fallback is None]
    if not active:
        return False
    for s in active:
        s.fallback = reason
    warnings.warn(
        f"torch.compile failed for {type(model).__name__} ({reason}); "
        "running the eager forward and backward",
        RuntimeWarning,
        stacklevel=2,
    )
    reset_compiled()
    return True


def reset_compiled() -> None:
    """Forget every compiled graph (and cached GPU memory): between the models of one
    process (`maediff benchmark`), whose forwards share code, so that the later models
    do not pass Dynamo's recompile limit."""
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None:
        dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def speed_up(
    model: nn.Module,
    device: torch.device,
    channels_last: str = "auto",
    compile: str = "auto",
    training: bool = False,
) -> list[str]:
    """Apply the speed settings to `model` (in place) and return one line per setting
    saying what was decided and why. Models list the submodules worth compiling in
    `compile_targets` (default: the model itself)."""
    cuda = device.type == "cuda"
    cl, cl_note = _decide(
        channels_last,
        "channels_last",
        device.type == "cpu" and not training,
        "CUDA, not measured there yet"
        if cuda
        else f"{device.type}, {'training' if training else 'inference'}",
    )
    comp, comp_note = _decide(compile, "compile", cuda, "CUDA" if cuda else device.type)
    if cl:
        model.to(memory_format=torch.channels_last)
    if comp:
        # an AnomalyModel names its targets; any other module is compiled whole
        for m in getattr(model, "compile_targets", lambda: [model])():
            compile_with_fallback(m)
    if cuda:
        # training: fixed shapes, pick the fastest kernels once; inference: chunk sizes
        # vary per volume, and kernels picked by timing would differ between runs
        torch.backends.cudnn.benchmark = training
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return [cl_note, comp_note]


__all__ = [
    "NOT_COMPILE_ERRORS",
    "CompileState",
    "autocast_context",
    "compile_with_fallback",
    "cuda_bf16_native",
    "fall_back_to_eager",
    "full_fp32",
    "grad_scaler",
    "resolve_amp",
    "reset_compiled",
    "resolve_device",
    "local_cuda_index",
    "speed_up",
    "to_device",
]
