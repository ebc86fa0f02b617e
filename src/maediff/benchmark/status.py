"""Whether a benchmark run is finished: its status.json, written last of all
(`maediff benchmark` marks it; `benchmark --list` and its estimates read it), or
served by its twin row's finished run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..config import load_config, to_dict
from ..registry import preset_info
from ..reporting.files import write_atomic
from ..reporting.summary import SUMMARY_FILE
from .plan import BenchmarkPlan, RunSpec

STATUS_FILE = "status.json"  # {"state": "running"}, then {"state": "done", "files": [...]}


def is_done(folder: Path) -> bool:
    """A run is finished when its status.json says "done", written after everything
    else, and every file it lists exists. (A folder of a version before status.json,
    which has none: when timing.json, which those versions wrote last, exists and is
    no older than eval/summary.json.)"""
    status = folder / STATUS_FILE
    if status.exists():
        try:
            saved = json.loads(status.read_text())
            files = saved["files"] if saved["state"] == "done" else None
        except (json.JSONDecodeError, KeyError, TypeError):
            return False
        return files is not None and all((folder / f).exists() for f in files)
    summary, timing = folder / "eval" / SUMMARY_FILE, folder / "timing.json"
    return (
        summary.exists()
        and timing.exists()
        and timing.stat().st_mtime_ns >= summary.stat().st_mtime_ns
    )


def mark_status(folder: Path, files: list[str] | None = None) -> None:
    """status.json: "running" (no files), or "done" with the run's files (relative to
    its folder), written last of all."""
    if files is None:
        write_atomic(folder / STATUS_FILE, json.dumps({"state": "running"}))
        return
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise RuntimeError(f"{folder}: cannot mark the run finished, {missing} missing")
    write_atomic(folder / STATUS_FILE, json.dumps({"state": "done", "files": files}, indent=2))


def twin_of(model: str) -> str | None:
    """A row whose configuration is this one's (only the preset name differs; its
    declaration's `same_as`): a finished run of either serves both tables."""
    return preset_info(model).same_as


def twin_run(plan: BenchmarkPlan, spec: RunSpec, out: Path) -> RunSpec | None:
    """The twin row's finished run of the same fold and seed, when the configuration it
    saved is this run's less the preset name: it serves this run, which is then neither
    trained nor evaluated again (Table 2's U-Net and U-Net + Att. + MAE are Table 1's
    pDDPM s16 and MAEDiff). None when there is no such run."""
    twin = twin_of(spec.model)
    if twin is None:
        return None
    other = replace(spec, model=twin)
    folder = out / "runs" / other.key
    if not is_done(folder):
        return None
    try:
        theirs = load_config(folder / "config.yaml")
    except (OSError, ValueError):
        return None
    same = to_dict(replace(theirs, name="")) == to_dict(replace(plan.config(spec), name=""))
    return other if same else None


__all__ = ["STATUS_FILE", "is_done", "mark_status", "twin_of", "twin_run"]
