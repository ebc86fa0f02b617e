"""Speed settings: the fused attention path, channels_last / torch.compile decisions and
the compile fallback. Timings live in benchmarks/bench_speed.py, not here."""

import warnings
from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import draw_zero_layers
from maediff.config import get_preset
from maediff.device import compile_with_fallback, speed_up
from maediff.models.maediff import MAEDiff
from maediff.models.unet import AttentionBlock


def einsum_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out in float64 (softmax(q k^T / sqrt(c)) v)."""
    B, C, H, W = x.shape
    h, c = block.heads, C // block.heads
    x64 = x.double()
    norm = torch.nn.functional.group_norm(
        x64,
        block.norm.num_groups,
        block.norm.weight.double(),
        block.norm.bias.double(),
        block.norm.eps,
    )
    qkv = torch.nn.functional.conv1d(
        norm.reshape(B, C, H * W), block.qkv.weight.double(), block.qkv.bias.double()
    ).reshape(B, 3, h, c, H * W)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, h, c, L)
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / c**0.5, dim=-1)
    out = torch.einsum("bhts,bhcs->bhct", w, v).reshape(B, C, H * W)
    proj = torch.nn.functional.conv1d(out, block.proj.weight.double(), block.proj.bias.double())
    return x64 + proj.reshape(B, C, H, W)


def _attention_block(gen) -> AttentionBlock:
    block = AttentionBlock(64, 32, 16)
    with torch.no_grad():
        block.proj.weight.copy_(0.1 * torch.randn(block.proj.weight.shape, generator=gen))
    return block


def test_unet_attention_equals_the_float64_formula(gen):
    block = _attention_block(gen)
    x = torch.randn(2, 64, 12, 12, generator=gen)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out.double(), einsum_attention(block, x), atol=1e-5, rtol=1e-5)


def test_unet_attention_takes_the_fused_kernel(gen):
    """With a strided last dimension the CPU dispatcher falls back to the unfused math
    path (2.5x slower at the cpu preset); q, k and v must reach it contiguous."""
    block = _attention_block(gen)
    x = torch.randn(2, 64, 12, 12, generator=gen)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x)
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in names
    assert any("flash_attention" in n or "efficient_attention" in n for n in names), names


@pytest.mark.parametrize(
    "training, expected",
    [
        (False, ["channels_last on (auto: cpu, inference)", "compile off (auto: cpu)"]),
        (True, ["channels_last off (auto: cpu, training)", "compile off (auto: cpu)"]),
    ],
)
def test_auto_speed_settings_on_the_cpu(training, expected):
    model = MAEDiff(get_preset("tiny"))
    notes = speed_up(model, torch.device("cpu"), "auto", "auto", training=training)
    assert notes == expected
    conv = model.net.input_blocks[1][0].in_conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == (not training)


def test_channels_last_keeps_the_reconstruction(gen):
    model = draw_zero_layers(MAEDiff(get_preset("tiny")).eval(), gen)
    x = torch.rand(2, 1, 32, 32, generator=gen)
    before = model.reconstruct(x, torch.Generator().manual_seed(0))
    speed_up(model, torch.device("cpu"), channels_last="on", compile="off")
    after = model.reconstruct(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_speed_settings_are_checked():
    with pytest.raises(ValueError, match="compile='yes'"):
        speed_up(torch.nn.Linear(2, 2), torch.device("cpu"), "auto", "yes")
    with pytest.raises(ValueError, match="inference.compile"):
        replace(get_preset("tiny").inference, compile="always")


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(fn, *a, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    expected = lin(x)
    compile_with_fallback(lin)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        out = lin(x)
    torch.testing.assert_close(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then eager silently
        torch.testing.assert_close(lin(x), expected)
    assert set(lin.state_dict()) == {"weight", "bias"}


def test_compile_on_uses_the_compiled_forward(monkeypatch):
    calls = []

    def fake_compile(fn, *a, **kw):
        def run(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = MAEDiff(get_preset("tiny")).eval()
    speed_up(model, torch.device("cpu"), channels_last="off", compile="on")
    model.reconstruct(torch.rand(1, 1, 32, 32), torch.Generator().manual_seed(0))
    assert calls  # MAEDiff compiles its network (compile_targets), used by reconstruct
