"""What the study scripts (recipe_study.py, learning_curve.py) share: the CPU's name for
their records and the mean ± std cell of their tables."""

from __future__ import annotations

import statistics
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux) and its widest vector extension that bears on the
    precision ("AMD EPYC (AVX512-BF16)", "... (AMX)", "... (AVX2)"), or "unknown": one
    model name covers CPUs with and without native bf16."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"),
                        ("avx512f", "AVX512"), ("avx2", "AVX2")):  # fmt: skip
        if flag in flags:
            return f"{name} ({label})"
    return name


def mean_sd(values: list[float]) -> str:
    """ "-" for none, the value for one, mean ± std (ddof 1) for more."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
