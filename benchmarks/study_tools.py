"""What the study scripts (recipe_study.py, learning_curve.py) share: the CPU's name for
their records and the mean ± std cell of their tables."""

from __future__ import annotations

import statistics
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux), or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def mean_sd(values: list[float]) -> str:
    """ "-" for none, the value for one, mean ± std (ddof 1) for more."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
