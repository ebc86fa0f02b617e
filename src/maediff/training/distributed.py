"""Several processes under torchrun: joining the process group, DistributedDataParallel
around the model, each rank's share of an epoch, and the values the ranks agree on.

    ddp = setup_distributed("auto")            # one process: Distributed(0, 1, 0)
    net = wrap_distributed(model, dev, find_unused_parameters=False)

Every reduction runs on the training device: NCCL reduces CUDA tensors only. The
trainer (training/trainer.py) uses these; rank 0 validates, logs and writes files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..device import local_cuda_index
from ..models import AnomalyModel


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


# how long a collective (the barrier after rank 0 writes a checkpoint, the first
# compiled steps of ranks that compile at different speeds) may wait for the slowest
# rank; NCCL's default is 10 minutes
TIMEOUT = timedelta(minutes=30)


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_global_batch(batch_size: int, world: int) -> None:
    """train.batch_size is the global batch: each of the `world` ranks takes an equal
    share, so it must divide (10 per rank of 3 would train with 30, not 32)."""
    if world > 1 and batch_size % world:
        raise ValueError(
            f"train.batch_size={batch_size} (the global batch) must be divisible by the "
            f"{world} torchrun processes; set it to a multiple of {world}"
        )


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group that torchrun describes in the environment, if any."""
    world = world_size()
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = distributed_backend(device_name)
        if backend == "nccl":  # the GPU resolve_device gives this rank (LOCAL_RANK modulo)
            torch.cuda.set_device(local_cuda_index(local))
        dist.init_process_group(backend, timeout=TIMEOUT)
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


def largest_over_ranks(value: float, dev: torch.device) -> float:
    """The largest `value` of all ranks (call it on every rank), reduced on `dev`."""
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sum_over_ranks(values: list[float], dev: torch.device) -> list[float]:
    """Each of `values` summed over the ranks (call it on every rank), reduced on `dev`."""
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of the 0-dim tensor `value` over the ranks (call it on every rank), on
    its device: with NCCL the reduction is queued on the GPU's stream and the host does
    not wait for it (the trainer logs the mean loss of all ranks, not rank 0's)."""
    t = value.detach().float().reshape(1).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t[0] / world


def shard(items: list, ddp: Distributed) -> list:
    """This rank's share of an epoch; padded by repeating so every rank takes the same
    number of steps (DistributedDataParallel needs matching backward passes)."""
    if ddp.world == 1:
        return items
    n = math.ceil(len(items) / ddp.world) * ddp.world
    padded = (items * math.ceil(n / len(items)))[:n]
    return padded[ddp.rank :: ddp.world]


def barrier(ddp: Distributed) -> None:
    """Wait for every rank (nothing in one process)."""
    if ddp.world > 1:
        dist.barrier()


def leave_distributed(ddp: Distributed) -> None:
    if ddp.world > 1:
        dist.destroy_process_group()


__all__ = [
    "Distributed",
    "TIMEOUT",
    "barrier",
    "check_global_batch",
    "distributed_backend",
    "largest_over_ranks",
    "leave_distributed",
    "mean_over_ranks",
    "setup_distributed",
    "shard",
    "sum_over_ranks",
    "world_size",
    "wrap_distributed",
]
