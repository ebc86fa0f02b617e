"""Whether a benchmark run is finished: its status.json, written last of all
(`maediff benchmark` marks it; `benchmark --list` and its estimates read it)."""

from __future__ import annotations

import json
from pathlib import Path

from ..reporting.files import write_atomic
from ..reporting.summary import SUMMARY_FILE

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


__all__ = ["STATUS_FILE", "is_done", "mark_status"]
