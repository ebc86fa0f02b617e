"""Alg. 2 and training speed against the reference implementation, in one run.

    python benchmarks/bench_speed.py [--model RUN] [--repeats 3] [--paper-slices 1]

Measures on this machine, medians of --repeats (run it on an otherwise idle machine):

1. the matmul peak of the dtype the package computes in here (fp32, or bf16 where it
   is native) and the FLOPs of one U-Net + MAE forward (torch.utils.flop_counter);
2. one 50-slice volume at the `cpu` preset through
   - the reference loop (pDDPM's inference: one patch position at a time, all slices
     in one fp32 batch, every patch; the U-Net's attention as pDDPM's
     QKVAttentionLegacy computes it: einsum, softmax, einsum), and
   - `MAEDiff.reconstruct` as `detect` and `evaluate` run it (the preset's batch size
     and autocast, the inference speed settings of `load_model`),
   with the largest difference of the two maps inside the brain (same noise);
3. the same ratio at the `paper` preset on --paper-slices slices;
4. `detect` end to end on one NIfTI file, and the share of it spent in reconstruct;
5. training steps per second at the `cpu` preset, reference attention against ours;
6. with --profile, where reconstruct's time goes: torch.profiler's self time per op,
   grouped (convolutions, fused attention, linear layers, norms, activations,
   elementwise, copies), on 16 slices of the volume.

Without --model the weights are random (the zero-initialised output layers drawn
too, so that the maps are not trivially equal); speed does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from study_tools import matmul_peak, median_seconds, train_step_seconds
from torch.utils.flop_counter import FlopCounterMode

from maediff import __version__
from maediff.config import get_preset
from maediff.data.synthetic import make_subject, template
from maediff.device import resolve_amp, speed_up
from maediff.models import build_model
from maediff.models import unet as unet_module
from maediff.models.maediff import from_model_range, to_model_range
from maediff.weights import load_model


def legacy_attention(self, x, emb=None):
    """pDDPM's (openai's) QKVAttentionLegacy: einsum over strided q/k/v, softmax, einsum."""
    B, C, H, W = x.shape
    c = C // self.heads
    qkv = self.qkv(self.norm(x).reshape(B, C, H * W)).reshape(B, 3, self.heads, c, H * W)
    q, k, v = (qkv[:, i].reshape(B * self.heads, c, H * W) for i in range(3))  # our layout
    scale = 1 / c**0.25
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    out = torch.einsum("bts,bcs->bct", w, v).reshape(B, C, H * W)
    return x + self.proj(out).reshape(B, C, H, W)


@contextlib.contextmanager
def reference_attention():
    fused = unet_module.AttentionBlock.forward
    unet_module.AttentionBlock.forward = legacy_attention
    try:
        yield
    finally:
        unet_module.AttentionBlock.forward = fused


@torch.no_grad()
def reference_reconstruct(model, slices: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """pDDPM's loop: per patch position, every slice in one fp32 batch; overlaps averaged."""
    S, K = slices.shape[0], model.grid.num_patches
    x = to_model_range(slices)
    t = torch.full((S,), model.cfg.diffusion.t_test, dtype=torch.long)
    x_t = model.diffusion.q_sample(x, t, noise)
    patches = model.grid.extract(x)
    with reference_attention():
        for k in range(K):
            kk = torch.full((S,), k, dtype=torch.long)
            pred = model.denoise(model.noised_input(x, x_t, kk), t, kk, x)
            patches[:, k] = model.grid.crop(pred, kk)
    return from_model_range(model.grid.stitch(patches))


def randomise_zero_layers(model) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def test_volume(size: int) -> tuple[torch.Tensor, torch.Tensor, nib.Nifti1Image]:
    """A synthetic tumour volume as model slices (50, 1, size, size) and as a NIfTI file."""
    sub = make_subject(0, "tumour", 0)
    img, mask = sub["image"], sub["mask"] > 0
    vol = np.clip(img / np.percentile(img[mask], 99), 0, 1) * mask
    s = torch.from_numpy(np.moveaxis(vol, -1, 0)[:, None].astype(np.float32))
    m = torch.from_numpy(np.moveaxis(mask, -1, 0)[:, None].astype(np.float32))
    s = torch.nn.functional.interpolate(s, size=(size, size), mode="area")
    m = (torch.nn.functional.interpolate(m, size=(size, size), mode="area") > 0).float()
    return s, m, nib.Nifti1Image(img, template()["affine"])


def compare(model, slices, brain, repeats: int, label: str, amp: str = "auto") -> dict:
    S = slices.shape[0]
    noise = model.noise(S, torch.Generator().manual_seed(0))
    ref = reference_reconstruct(model, slices, noise)

    def pkg_run():
        return model.reconstruct(slices, noise=noise, brain_mask=brain, amp=amp)

    pkg = pkg_run()
    diff = float(((ref - pkg).abs() * brain).max())
    t_ref = median_seconds(lambda: reference_reconstruct(model, slices, noise), repeats)
    t_pkg = median_seconds(pkg_run, repeats)
    return {
        "label": label,
        "ref_s": t_ref,
        "pkg_s": t_pkg,
        "diff": diff,
        "pairs": S * model.grid.num_patches,
    }


def detect_share(model, nifti: nib.Nifti1Image, repeats: int) -> tuple[float, float]:
    from maediff.data.io import Subject
    from maediff.pipeline.detect import detect_files

    spent: list[float] = []
    inner = model.reconstruct

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        spent.append(time.perf_counter() - t0)
        return out

    model.reconstruct = timed
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan_t2.nii.gz"
        nib.save(nifti, str(path))
        for i in range(repeats):
            t0 = time.perf_counter()
            detect_files([Subject("scan", path)], Path(tmp) / f"out{i}", model, progress=False)
            totals.append(time.perf_counter() - t0)
    model.reconstruct = inner
    return statistics.median(totals), statistics.median(spent)


# torch.profiler op names -> what they are in the U-Net + MAE forward
OP_GROUPS = {
    "convolutions (oneDNN)": ("aten::mkldnn_convolution", "aten::convolution_overrideable"),
    "attention (fused SDPA)": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
        "aten::bmm",
        "aten::_softmax",
    ),
    "linear layers (MAE, embeddings)": ("aten::addmm", "aten::mm"),
    "GroupNorm, LayerNorm": ("aten::native_group_norm", "aten::native_layer_norm"),
    "SiLU, GELU": ("aten::silu", "aten::gelu"),
    "add, mul (residuals, scales)": ("aten::add", "aten::mul", "aten::add_", "aten::mul_"),
    "copies, cat, resampling, indexing": (
        "aten::copy_",
        "aten::cat",
        "aten::upsample_nearest2d",
        "aten::avg_pool2d",
        "aten::index",
        "aten::gather",
        "aten::_to_copy",
    ),
}


def op_profile(model, slices, brain, amp: str = "auto") -> tuple[float, dict[str, float]]:
    """(seconds, group -> % of the self CPU time) of one reconstruct of these slices."""
    from torch.profiler import ProfilerActivity, profile

    noise = model.noise(slices.shape[0], torch.Generator().manual_seed(0))
    model.reconstruct(slices[:2], noise=noise[:2], brain_mask=brain[:2], amp=amp)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        model.reconstruct(slices, noise=noise, brain_mask=brain, amp=amp)
        seconds = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    shares = {
        group: 100 * sum(e.self_cpu_time_total for e in events if e.key in names) / total
        for group, names in OP_GROUPS.items()
    }
    shares["everything else"] = 100 - sum(shares.values())
    return seconds, shares


def op_timings(repeats: int) -> list[tuple[str, str, float]]:
    """(op at a shape of the `cpu` preset, variant, ms): GroupNorm in fp32 and bf16, on
    NCHW and channels_last tensors (inference runs channels_last on the CPU), and the
    fused attention at the two attention resolutions, fp32 against bf16. The ops whose
    bf16 kernels decide whether bf16 autocast pays on a CPU."""
    F = torch.nn.functional
    out = []
    with torch.no_grad():
        for c, h in ((16, 48), (32, 24), (64, 12)):  # batch 64: one inference chunk's pairs
            x = torch.randn(64, c, h, h)
            for dtype in (torch.float32, torch.bfloat16):
                norm = torch.nn.GroupNorm(8, c).to(dtype)
                for layout in (torch.contiguous_format, torch.channels_last):
                    xx = x.to(dtype).contiguous(memory_format=layout)
                    norm(xx)  # warm-up: allocations, the kernel's first dispatch
                    ms = (
                        1e3
                        * median_seconds(lambda n=norm, v=xx: [n(v) for _ in range(10)], repeats)
                        / 10
                    )
                    name = "NCHW" if layout is torch.contiguous_format else "channels_last"
                    variant = f"{str(dtype)[6:]}, {name}"
                    out.append((f"GroupNorm 64x{c}x{h}x{h}", variant, ms))
        for tokens in (576, 144):  # 24x24 and 12x12, head width 32
            q = torch.randn(32, 2, tokens, 32)
            for dtype in (torch.float32, torch.bfloat16):
                qq = q.to(dtype)
                F.scaled_dot_product_attention(qq, qq, qq)  # warm-up
                ms = (
                    1e3
                    * median_seconds(
                        lambda v=qq: [F.scaled_dot_product_attention(v, v, v) for _ in range(5)],
                        repeats,
                    )
                    / 5
                )
                out.append((f"attention 32x2 heads x{tokens} tokens", str(dtype)[6:], ms))
    return out


def train_steps_per_s(cfg, steps: int, repeats: int) -> float:
    torch.manual_seed(0)
    return 1 / train_step_seconds(build_model(cfg), cfg, steps, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="trained cpu-preset run folder (default: random weights)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paper-slices", type=int, default=1, help="0 skips the paper preset")
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--slices", type=int, default=50, help="slices of the cpu-preset volume")
    ap.add_argument("--profile", action="store_true", help="reconstruct's time per op group")
    ap.add_argument(
        "--ops",
        action="store_true",
        help="only time GroupNorm and attention alone (fp32 and bf16, NCHW and "
        "channels_last) and exit",
    )
    ap.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "none", "bf16"),
        help="maediff's autocast (the reference loop stays fp32); auto: bf16 where native",
    )
    args = ap.parse_args()
    dev = torch.device("cpu")
    amp = resolve_amp(args.amp, dev)
    print(
        f"maediff {__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, autocast '{args.amp}' -> {amp}"
    )
    peak = matmul_peak(torch.bfloat16 if amp == "bf16" else torch.float32)
    print(f"matmul peak ({'bf16' if amp == 'bf16' else 'fp32'}, 2048^3): {peak:.0f} GFLOP/s\n")
    if args.ops:
        print("| op | variant | ms |\n|---|---|---|")
        for op, variant, ms in op_timings(max(args.repeats, 5)):
            print(f"| {op} | {variant} | {ms:.2f} |")
        return

    if args.model:
        model = load_model(args.model, dev)
    else:
        model = build_model(get_preset("cpu"))
        randomise_zero_layers(model)
        model.eval()
        print("notes:", "; ".join(speed_up(model, dev, "auto", "auto")))
    H = model.cfg.geometry.image_size
    slices, brain, nifti = test_volume(H)
    x = slices[:32]
    k = torch.arange(32) % model.grid.num_patches
    t = torch.full((32,), model.cfg.diffusion.t_test)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.denoise(to_model_range(x), t, k, to_model_range(x))
    gflop = fc.get_total_flops() / 32 / 1e9

    slices, brain = slices[: args.slices], brain[: args.slices]
    rows = [
        compare(
            model, slices, brain, args.repeats, f"cpu preset, one {len(slices)}-slice volume", amp
        )
    ]
    if args.paper_slices:
        paper = build_model(get_preset("paper"))
        randomise_zero_layers(paper)
        paper.eval()
        speed_up(paper, dev, "auto", "auto")
        ps, pb, _ = test_volume(paper.cfg.geometry.image_size)
        mid = ps.shape[0] // 2
        sl = slice(mid, mid + args.paper_slices)
        rows.append(
            compare(paper, ps[sl], pb[sl], 1, f"paper preset, {args.paper_slices} slice(s)", amp)
        )
    print(
        "| Alg. 2 | reference loop (s) | maediff (s) | speed-up | max map difference in the brain |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | {r['ref_s']:.1f} | {r['pkg_s']:.1f} | {r['ref_s'] / r['pkg_s']:.2f}x | {r['diff']:.4f} |"
        )
    achieved = gflop * rows[0]["pairs"] / rows[0]["pkg_s"]
    print(
        f"\nU-Net + MAE forward at the cpu preset: {gflop:.2f} GFLOP per (slice, patch) pair; "
        f"reconstruct runs at {achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f} % of the matmul peak"
    )

    if args.profile:
        mid = slices.shape[0] // 2
        seconds, shares = op_profile(
            model, slices[mid - 8 : mid + 8], brain[mid - 8 : mid + 8], amp
        )
        print(f"\nreconstruct of 16 slices under torch.profiler: {seconds:.2f} s")
        print("| op group | share of the self CPU time |\n|---|---|")
        for group, share in shares.items():
            print(f"| {group} | {share:.0f} % |")
        print()

    total, rec = detect_share(model, nifti, args.repeats)
    print(
        f"detect end to end (read, preprocess, reconstruct, post-process, write): {total:.1f} s, "
        f"of which reconstruct {rec:.1f} s ({100 * rec / total:.0f} %)"
    )

    cfg = get_preset("cpu")
    new = train_steps_per_s(cfg, args.train_steps, args.repeats)
    with reference_attention():
        old = train_steps_per_s(cfg, args.train_steps, args.repeats)
    print(
        f"training at the cpu preset (batch {cfg.train.batch_size}, fp32): reference attention "
        f"{old:.3f} steps/s, maediff {new:.3f} steps/s ({new / old:.2f}x)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
