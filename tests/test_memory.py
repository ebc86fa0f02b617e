"""The memory estimate checked before training (maediff/memory.py): measured
activations grow with the batch as estimated, the measurement leaves the model and the
generators as they were, and a training that does not fit stops with the numbers and a
batch size that fits."""

import pytest
import torch

import maediff.memory as memory
from maediff.config import get_preset
from maediff.memory import (
    check_training_memory,
    estimate_training_memory,
    saved_activation_bytes,
)
from maediff.models import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("preset", ["dae-tiny", "maediff-tiny"])
def test_the_activations_of_a_batch_are_its_samples_times_the_measured_one(preset):
    cfg = get_preset(preset)
    model = build_model(cfg).train()
    est = estimate_training_memory(model, cfg, CPU, batch_size=3)
    x = torch.rand(3, 1, cfg.geometry.image_size, cfg.geometry.image_size)
    measured = saved_activation_bytes(model, x, "model")
    # one sample's count, times 3, bounds what three samples keep, and not loosely
    assert 0.8 * est.per_sample * 3 <= measured <= est.per_sample * 3
    n = sum(p.numel() for p in model.parameters())
    assert est.weights >= 4 * n and est.optimizer == 2 * est.gradients == 8 * n


def test_the_measurement_leaves_statistics_and_generators_as_they_were():
    cfg = get_preset("fanogan-tiny")  # BatchNorm running statistics, three optimizer groups
    model = build_model(cfg).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    memory._MEASURED.clear()
    estimate_training_memory(model, cfg, CPU, batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())


def test_a_training_too_large_stops_with_a_batch_size_that_fits(monkeypatch):
    cfg = get_preset("maediff-tiny")
    model = build_model(cfg).train()
    est = estimate_training_memory(model, cfg, CPU, batch_size=8)
    free = est.fixed + 4.5 * est.per_sample  # room for 3 samples under WARN_FRACTION
    fixed_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(memory, "device_memory_available", lambda d: free - fixed_weights)
    with pytest.raises(
        ValueError,
        match=r"needs about .* at batch size 8 .*iB are free there: "
        r"--set train\.batch_size=(\d+) would fit",
    ) as e:
        check_training_memory(model, cfg, CPU, 8)
    fit = int(e.value.args[0].split("train.batch_size=")[1].split()[0])
    assert fit >= 1 and est.total(fit) <= memory.WARN_FRACTION * free < est.total(fit + 1)
    with pytest.warns(RuntimeWarning, match="little room left"):  # fits, but barely
        check_training_memory(model, cfg, CPU, 4)
    assert check_training_memory(model, cfg, CPU, 2) is not None  # fits: silent
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert check_training_memory(model, cfg, CPU, 8) is None


def test_the_free_memory_of_this_machine_is_read():
    free = memory.host_memory_available()
    assert free is None or free > 0


class _WideLinear(torch.nn.Module):
    """Wide weights (4 MB each in fp32) on small activations: autocast's bf16 copy of the
    second is kept for the backward pass (to pass the gradient on to the first), once
    per step whatever the batch."""

    input_kind = "slices"

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)

    def loss(self, x, gen, group="model"):
        return self.b(self.a(x.flatten(1)[:, :1024])).square().mean()


def test_autocast_weight_copies_are_counted_once_not_per_sample():
    from maediff.memory import saved_bytes

    model = _WideLinear()
    x = torch.rand(1, 1, 32, 32)
    with torch.autocast("cpu", torch.bfloat16):
        acts, copies = saved_bytes(model, x, "model")
    assert copies == 1024 * 1024 * 2  # the second layer's bf16 weight, 2 MB
    assert acts < 32 * 1024  # the sample's own tensors only (input, output: a few kB)
    with torch.autocast("cpu", torch.bfloat16):
        acts4, copies4 = saved_bytes(model, x.expand(4, -1, -1, -1).contiguous(), "model")
    assert copies4 == copies and acts4 > acts  # the copy does not grow with the batch
    assert saved_bytes(model, x, "model")[1] == 0  # fp32: no copies


def test_the_estimate_counts_ddp_buckets_and_weight_copies_in_the_fixed_part():
    cfg = get_preset("maediff-tiny")
    model = build_model(cfg)
    one = estimate_training_memory(model, cfg, CPU, batch_size=4)
    two = estimate_training_memory(model, cfg, CPU, batch_size=4, world=2)
    assert two.ddp_buckets == one.gradients > 0 and one.ddp_buckets == 0
    assert two.fixed == one.fixed + one.gradients
