#!/usr/bin/env bash
# The GPU check: one command for a person with one CUDA GPU, run as it is from the
# repository root (maediff installed), in at most 10 minutes on one H200-class GPU,
# compilation included:
#
#   bash benchmarks/gpu_check.sh [OUT]          # default OUT: gpu_check
#
# 1. the fast GPU tests (tests/test_gpu.py, `-m "gpu and not slow"`), at most 3 minutes;
# 2. the compiled bf16 MAEDiff case of tests/test_gpu.py, at most 2 minutes;
# 3. benchmarks/bench_gpu.py at the paper scale with a 4-minute budget (its compiled
#    rows are stopped when the budget is spent), at most 4.5 minutes.
#
# Each step runs under `timeout`, so the whole stays within 9.5 minutes plus start-up.
# It writes OUT/gpu_check.json (each step's outcome, the benchmark's report) and prints
# a table: forward TFLOP/s as a fraction of the GPU's bf16 matmul peak, seconds per
# paper-scale volume, training step time, peak memory and compile time. The exit status
# is non-zero when a step failed or ran out of time.
#
# Without CUDA (CI, a laptop) it runs at the tiny scale on the CPU: the GPU tests would
# all skip and are not started; the benchmark runs a few steps, uncompiled.
# GPU_CHECK_SCALE=tiny|cpu|paper overrides the scale.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda
    SCALE=${GPU_CHECK_SCALE:-paper}
    BENCH=(--max-minutes 4 --steps 20)
else
    DEVICE=cpu
    SCALE=${GPU_CHECK_SCALE:-tiny}
    BENCH=(--max-minutes 1 --steps 2 --slices 2 --compile off)
fi
echo "gpu_check: device $DEVICE, scale $SCALE -> $OUT"

status() {  # the outcome of a step from its exit code: 124 is timeout's
    case "$1" in
        0) echo passed ;;
        124) echo "timed out" ;;
        skipped) echo skipped ;;
        *) echo "failed (exit $1)" ;;
    esac
}

if [ "$DEVICE" = cuda ]; then
    timeout 180 "$PY" -m pytest -q -m "gpu and not slow" tests/test_gpu.py \
        --junitxml "$OUT/fast_tests.xml"
    FAST=$?
    timeout 120 "$PY" -m pytest -q tests/test_gpu.py \
        -k "test_every_model_trains_and_reconstructs_on_cuda and maediff and bf16 and compiled" \
        --junitxml "$OUT/compiled_bf16.xml"
    COMPILED=$?
else
    FAST=skipped
    COMPILED=skipped
fi
timeout 270 "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --scale "$SCALE" "${BENCH[@]}" \
    --json "$OUT/bench_gpu.json"
BENCH_RC=$?

"$PY" - "$OUT" "$(status "$FAST")" "$(status "$COMPILED")" "$(status "$BENCH_RC")" <<'PYEOF'
import json
import sys
from pathlib import Path

out, fast, compiled, bench = Path(sys.argv[1]), *sys.argv[2:]
path = out / "bench_gpu.json"
report = json.loads(path.read_text()) if path.exists() else None
steps = {"fast GPU tests": fast, "compiled bf16 MAEDiff": compiled, "bench_gpu.py": bench}
rows = []
if report is not None:
    env, peak = report["environment"], report["peak"]
    for r in report["reconstruct"]:
        if "skipped" in r:
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
            }
        )
    for row in rows:
        train = [
            t
            for t in report["training"]
            if t["preset"] == row["preset"] and "skipped" not in t and t["loss_finite"]
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
summary = {"steps": steps, "summary": rows, "bench_gpu": report}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))


def cell(v, spec):
    return "n/a" if v is None else format(v, spec)


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
    "| peak memory | compile |"
)
print("|---|---|---|---|---|---|")
for r in rows:
    print(
        f"| {r['preset']} | {r['forward_tflops']:.3g} ({100 * r['share_of_peak']:.1f} %) "
        f"| {r['seconds_per_volume']:.3g} s ({r['reconstruct_precision']}) "
        f"| {cell(r['step_s'], '.3g')} s ({r['step_mode']}) "
        f"| {cell(r['peak_memory_gib'], '.1f')} GiB | {cell(r['compile_s'], '.0f')} s |"
    )
print(f"\nwritten: {out / 'gpu_check.json'}")
failed = [n for n, o in steps.items() if o not in ("passed", "skipped")]
sys.exit(1 if failed or report is None else 0)
PYEOF
