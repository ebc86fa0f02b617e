#!/usr/bin/env bash
# The GPU check: one command for a person with a CUDA GPU, run as it is from the
# repository root (maediff installed with its dev extras):
#
#   bash benchmarks/gpu_check.sh [OUT]          # default OUT: gpu_check
#
# 0. up front: torch must see the GPU that the machine shows (nvidia-smi lists one,
#    /dev/nvidia0 exists or CUDA_VISIBLE_DEVICES names one); otherwise it stops with
#    exit status 2 (a driver / torch build mismatch, the commonest first-day failure)
#    unless GPU_CHECK_ALLOW_CPU=1. On CUDA it also stops when pytest or a C compiler
#    (Triton builds its launcher with one) is missing.
# 1. the fast GPU tests (tests/test_gpu.py, `-m "gpu and not slow"`), at most 2 minutes;
# 2. benchmarks/gpu_end_to_end.py at the paper scale: 40 steps of trainer.train,
#    compiled in bf16, through a last partial batch, a validation and a checkpoint; a
#    resume; load_model compiled, one volume against eager; at most 4 minutes;
# 3. benchmarks/bench_gpu.py at the paper scale, its compiled MAEDiff row first with its
#    own budget (105 s), the whole within 3.25 minutes; at most 3.5 minutes;
# 4. with two or more GPUs: `torchrun --standalone --nproc_per_node 2 -m maediff train`
#    on a small synthetic data set (NCCL, DDP), at most 2.5 minutes.
#
# Each step runs under `timeout`: one GPU, at most 9.5 minutes plus start-up (about 10
# in all); two or more, 12. It writes OUT/gpu_check.json (each step's outcome and the
# reports) and prints a table. The exit status is non-zero when a step failed or ran out
# of time, and 2 when the check could not start.
#
# Without CUDA (CI, a laptop) the same steps run at the tiny scale on the CPU: no GPU
# tests (they would all skip), the end-to-end case uncompiled, the benchmark for a few
# steps, the torchrun case with gloo. GPU_CHECK_SCALE=tiny|cpu|paper overrides the
# scale; GPU_CHECK_DDP=auto|on|off the torchrun step (auto: two GPUs, or the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
PY=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
stop() {  # the check cannot start: one line, exit status 2
    echo "gpu_check: $*" >&2
    exit 2
}

# ------------------------------------------------------------------ 0. up front
TORCH=$("$PY" -c "import torch; print(int(torch.cuda.is_available()), torch.__version__, torch.version.cuda or 'none', torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>&1) \
    || stop "python cannot import torch ($PY): ${TORCH##*$'\n'}"
read -r CUDA_OK TORCH_VERSION TORCH_CUDA GPUS <<<"${TORCH##*$'\n'}"  # its last line

gpu_seen() {  # why this machine seems to have an NVIDIA GPU; empty if it does not
    if command -v nvidia-smi >/dev/null 2>&1; then
        local line
        line=$(nvidia-smi -L 2>/dev/null | grep -m1 '^GPU')
        [ -n "$line" ] && { echo "nvidia-smi lists '$line'"; return; }
    fi
    if ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
        echo "/dev/nvidia0 exists"
        return
    fi
    case "${CUDA_VISIBLE_DEVICES-}" in
        "" | -1 | NoDevFiles) ;;
        *) echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" ;;
    esac
}

MISSING=()  # said first, whatever the device
"$PY" -c "import pytest" >/dev/null 2>&1 || MISSING+=("pytest (pip install -e '.[dev]')")
CC_FOUND=
for c in ${CC:-} cc gcc clang; do
    command -v "$c" >/dev/null 2>&1 && { CC_FOUND=$c; break; }
done
[ -n "$CC_FOUND" ] || MISSING+=("a C compiler (cc, gcc or clang: Triton compiles its GPU launcher with one)")
[ ${#MISSING[@]} -eq 0 ] || echo "gpu_check: missing: $(IFS=';'; echo "${MISSING[*]}")"

if [ "$CUDA_OK" = 1 ]; then
    DEVICE=cuda
    SCALE=${GPU_CHECK_SCALE:-paper}
else
    DEVICE=cpu
    SCALE=${GPU_CHECK_SCALE:-tiny}
    SEEN=$(gpu_seen)
    if [ -n "$SEEN" ]; then
        build="torch $TORCH_VERSION, built for CUDA $TORCH_CUDA"
        [ "$TORCH_CUDA" = none ] && build="torch $TORCH_VERSION, a CPU-only build"
        if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
            stop "a GPU is visible ($SEEN) but torch.cuda.is_available() is False ($build):" \
                "install the torch build for this driver (nvidia-smi shows the driver's CUDA" \
                "version); GPU_CHECK_ALLOW_CPU=1 runs the CPU check instead"
        fi
        echo "gpu_check: a GPU is visible ($SEEN) but torch cannot use it ($build);" \
            "GPU_CHECK_ALLOW_CPU=1: going on on the CPU"
    fi
fi
if [ ${#MISSING[@]} -gt 0 ]; then
    [ "$DEVICE" = cuda ] && stop "cannot run the GPU steps without what is missing (above)"
    echo "gpu_check: (what is missing is needed on a GPU, not for the CPU check)"
fi

case "${GPU_CHECK_DDP:-auto}" in
    on) DDP=1 ;;
    off) DDP=0 ;;
    *) if [ "$DEVICE" = cpu ] || [ "$GPUS" -ge 2 ]; then DDP=1; else DDP=0; fi ;;
esac
mkdir -p "$OUT"
echo "gpu_check: device $DEVICE ($GPUS GPUs), torch $TORCH_VERSION, scale $SCALE -> $OUT"

status() {  # the outcome of a step from its exit code: 124 is timeout's
    case "$1" in
        0) echo passed ;;
        124) echo "timed out" ;;
        skipped) echo skipped ;;
        *) echo "failed (exit $1)" ;;
    esac
}

# ------------------------------------------------------------------ 1-4. the steps
if [ "$DEVICE" = cuda ]; then
    timeout 120 "$PY" -m pytest -q -m "gpu and not slow" tests/test_gpu.py \
        --junitxml "$OUT/fast_tests.xml"
    FAST=$?
    E2E=(--device cuda --scale "$SCALE" --steps 40 --compile on)
    BENCH=(--device cuda --scale "$SCALE" --max-minutes 3.25 --first-row-minutes 1.75 --steps 20)
    DDP_ARGS=(--device cuda --steps 10 --set train.compile=off)
else
    FAST=skipped
    E2E=(--device cpu --scale "$SCALE" --steps 8 --compile off)
    BENCH=(--device cpu --scale "$SCALE" --max-minutes 1 --first-row-minutes 1 --steps 2 --slices 2 --compile off)
    DDP_ARGS=(--device cpu --steps 4)
fi

timeout 240 "$PY" benchmarks/gpu_end_to_end.py "${E2E[@]}" --out "$OUT/end_to_end" \
    --json "$OUT/end_to_end.json"
E2E_RC=$?

timeout 210 "$PY" benchmarks/bench_gpu.py "${BENCH[@]}" --json "$OUT/bench_gpu.json"
BENCH_RC=$?

DDP_RC=skipped
if [ "$DDP" = 1 ]; then
    # a small synthetic data set in pDDPM's layout (IXI fold 0: 8 training volumes),
    # then the README's command on two processes, each with its own GPU (NCCL), or
    # gloo on the CPU; --standalone: a free port, two jobs on a node do not collide
    PRESET=maediff
    [ "$SCALE" = paper ] || PRESET="maediff-$SCALE"
    timeout 150 bash -c '
        "$1" -m maediff synth -o "$2/ddp_data" --healthy 10 --healthy-test 1 --tumour-val 1 \
            --tumour-test 1 --ms-val 1 --ms-test 1 --overwrite -q &&
        "$3" --standalone --nproc_per_node 2 -m maediff train --data "$2/ddp_data" \
            --preset "$4" --fold 0 --run-dir "$2/ddp_run" --overwrite -q "${@:5}" &&
        "$1" -c "import json, sys; s = json.load(open(sys.argv[1])); sys.exit(0 if s[\"world_size\"] == 2 else 1)" \
            "$2/ddp_run/train_summary.json"
    ' _ "$PY" "$OUT" "$TORCHRUN" "$PRESET" "${DDP_ARGS[@]}"
    DDP_RC=$?
fi

# ------------------------------------------------------------------ the summary
"$PY" - "$OUT" "$(status "$FAST")" "$(status "$E2E_RC")" "$(status "$BENCH_RC")" \
    "$(status "$DDP_RC")" <<'PYEOF'
import json
import sys
from pathlib import Path

out, fast, e2e, bench, ddp = Path(sys.argv[1]), *sys.argv[2:]


def read(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


report, end_to_end = read("bench_gpu.json"), read("end_to_end.json")
steps = {
    "fast GPU tests": fast,
    "end to end (train, resume, compiled inference)": e2e,
    "bench_gpu.py": bench,
    "DDP: torchrun --standalone, 2 processes": ddp,
}
rows = []
if report is not None:
    env, peak = report["environment"], report["peak"]
    for r in report["reconstruct"]:
        if "skipped" in r or "failed" in r:
            continue
        amp = r["fastest_amp"]
        precision = amp if amp != "none" else ("tf32" if env["tf32"] else "fp32")
        rows.append(
            {
                "preset": r["preset"],
                "forward_tflops": r[amp]["tflops"],
                "share_of_peak": r[amp]["share_of_peak"],
                "peak": f"{peak['dtype']} {peak['tflops']:.3g} TFLOP/s",
                "seconds_per_volume": r["seconds_per_volume"],
                "reconstruct_precision": precision,
                "bf16_vs_fp32": r.get("bf16_vs_fp32"),
            }
        )
    for row in rows:
        train = [
            t
            for t in report["training"]
            if t["preset"] == row["preset"] and t.get("loss_finite")
        ]
        fastest = max(train, key=lambda t: t["steps_per_s"], default=None)
        compiled_rows = [t for t in train if t["mode"] == "compiled"]
        memory = [t["peak_memory_gib"] for t in train if t.get("peak_memory_gib") is not None]
        row.update(
            step_s=1 / fastest["steps_per_s"] if fastest else None,
            step_mode=f"{fastest['mode']} {fastest['precision']}" if fastest else None,
            peak_memory_gib=max(memory) if memory else None,
            compile_s=compiled_rows[0]["first_step_s"] if compiled_rows else None,
        )
summary = {
    "steps": steps,
    "summary": rows,
    "end_to_end": end_to_end,
    "bench_gpu": report,
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))


def cell(v, spec):
    return "n/a" if v is None else format(v, spec)


def agreement(a):
    return "n/a" if a is None else f"{a['mean']:.1e}, {a['p999']:.1e}"


print()
print("| step | outcome |")
print("|---|---|")
for name, outcome in steps.items():
    print(f"| {name} | {outcome} |")
print()
if report is not None:
    print(
        f"{env.get('gpu') or 'CPU'}, torch {env['torch']}, scale {report['scale']}; "
        f"peak: {peak['dtype']} matmul {peak['tflops']:.3g} TFLOP/s (measured)"
    )
    print()
print(
    "| preset | forward TFLOP/s (share of peak) | s per volume | training step "
    "| peak memory | compile | bf16 maps vs fp32 (mean, 99.9th pct) |"
)
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(
        f"| {r['preset']} | {r['forward_tflops']:.3g} ({100 * r['share_of_peak']:.1f} %) "
        f"| {r['seconds_per_volume']:.3g} s ({r['reconstruct_precision']}) "
        f"| {cell(r['step_s'], '.3g')} s ({r['step_mode']}) "
        f"| {cell(r['peak_memory_gib'], '.1f')} GiB | {cell(r['compile_s'], '.0f')} s "
        f"| {agreement(r['bf16_vs_fp32'])} |"
    )
if end_to_end is not None:
    e = end_to_end
    print(
        f"\nend to end: {e['steps']} steps in {e['train_s']:.0f} s, resumed in "
        f"{e['resume_s']:.0f} s, compiled inference {e['compiled_reconstruct_s']:.1f} s "
        f"(first volume); failures: {len(e['failures'])}"
    )
for name, r in (("bench_gpu.py", report), ("end to end", end_to_end)):
    for f in (r or {}).get("failures", []):
        print(f"FAILED ({name}): {f}")
print(f"\nwritten: {out / 'gpu_check.json'}")
failed = [n for n, o in steps.items() if o not in ("passed", "skipped")]
sys.exit(1 if failed or report is None or end_to_end is None else 0)
PYEOF
