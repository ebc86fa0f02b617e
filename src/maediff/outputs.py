"""Outputs that appear whole or not at all, and the leftovers of a killed process.

    write_text_atomic(path, text)            # a temporary name, then one rename
    tmp = temp_path(path, ".nii.gz")         # .NAME.HOST-PID.tmp.nii.gz beside `path`
    stage = partial_path(folder)             # .NAME.HOST-PID.partial beside `folder`
    removed = clean_stale(folder)            # leftovers of dead processes in `folder`

Every output is written under a temporary name in its own folder and renamed into
place when it is complete (a rename within one folder is atomic), so a reader sees the
old file or the new one, never half of one. The temporary name starts with a dot (no
command reads dot-files as scans) and carries the writer's host and process id, so a
later run can tell the leftovers of a dead process, which it removes, from the work in
progress of a live one, which it leaves alone. A name from another host is never
removed: on a shared file system that process may still be running.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"

# .NAME.HOST-PID.tmp[EXT] (a file) or .NAME.HOST-PID.partial (a folder)
_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.(?:tmp(?:\.[A-Za-z0-9.]+)?|partial)$"
)


def owner_tag() -> str:
    """HOST-PID of this process, the part of a temporary name that says who writes it."""
    return f"{HOST}-{os.getpid()}"


def temp_path(path: str | Path, ext: str = "") -> Path:
    """The temporary name of `path` for this process: .NAME.HOST-PID.tmp + ext (an
    extension a writer needs, such as ".nii.gz" for nibabel)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{owner_tag()}.tmp{ext}")


def partial_path(folder: str | Path) -> Path:
    """The staging folder of `folder` for this process: .NAME.HOST-PID.partial beside it."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.{owner_tag()}.partial")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owner_dead(host: str, pid: int) -> bool:
    """True only for a process of this host that no longer runs (another host's process
    cannot be checked from here, and is presumed alive)."""
    return host == HOST and pid != os.getpid() and not pid_alive(pid)


def is_leftover(name: str) -> bool:
    """Whether `name` is a temporary file or staging folder of a dead process."""
    m = _LEFTOVER.match(name)
    return bool(m) and owner_dead(m["host"], int(m["pid"]))


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove the temporary files and staging folders that dead processes of this host
    left in `folder` (not below it); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if not is_leftover(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def exit_with_parent(parent: int | None = None, every_s: float = 0.5) -> None:
    """In a worker process: end it when its parent is gone (kill -9 included; the
    worker is then re-parented and os.getppid() changes). A pool worker blocked on its
    task pipe would otherwise wait forever, since its siblings hold that pipe open.
    Usable as a ProcessPoolExecutor initializer."""
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="maediff-parent-watch", daemon=True).start()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary name and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = [
    "clean_stale",
    "exit_with_parent",
    "is_leftover",
    "owner_dead",
    "owner_tag",
    "partial_path",
    "pid_alive",
    "temp_path",
    "write_text_atomic",
]
