"""Outputs that appear whole or not at all, and the leftovers of a killed process.

    write_text_atomic(path, text)            # a temporary name, then one rename
    tmp = temp_path(path, ".nii.gz")         # .NAME.HOST-PID.tmp.nii.gz beside `path`
    stage = partial_path(folder)             # .NAME.HOST-PID.partial beside `folder`
    removed = clean_stale(folder)            # leftovers of dead processes in `folder`
    check_outputs("calib/", "calibrate", ["calibration.json", "scans.csv"], overwrite,
                  inputs=[list_csv])         # before any work: refuse what is not ours
    record_outputs("calib/", "calibrate", ["calibration.json", "scans.csv"])  # then write

Every output is written under a temporary name in its own folder and renamed into
place when it is complete (a rename within one folder is atomic), so a reader sees the
old file or the new one, never half of one. The temporary name starts with a dot (no
command reads dot-files as scans) and carries the writer's host and process id, so a
later run can tell the leftovers of a dead process, which it removes, from the work in
progress of a live one, which it leaves alone. A name from another host is never
removed: on a shared file system that process may still be running.

The output rule of every command (docs/reliability.md): a command writes only the files
it declares, records them in OUT/.maediff-outputs.jsonl before it writes them, replaces
only files that record names as its own, and refuses any other existing file, before
any work, unless --overwrite. A file that is one of the command's inputs is refused
even with --overwrite, and so is a name that would leave the output folder
(`safe_name`). The files are written with the user's umask (`apply_umask`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterable
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


# ------------------------------------------------------------------ file modes


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it
    (/proc/self/status on Linux); else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> Path:
    """Give a file the mode any tool's new file has (0666 less the umask): writers that
    make private files (safetensors writes 0600) would keep a shared model unreadable."""
    os.chmod(path, 0o666 & ~current_umask())
    return Path(path)


# ------------------------------------------------------------------ the output rule

RECORD = ".maediff-outputs.jsonl"  # in an output folder: which command wrote which files


class OutputError(ValueError):
    """An output that the rule refuses, with the file named in the message."""


_BAD_NAME = re.compile(r"[/\\\x00-\x1f]")


def safe_name(name: str, where: str) -> str:
    """`name` (from a CSV, a participants table, a BIDS label) as the start of an output
    file name: refused when it could leave the output folder or hide as a temporary
    file (a path separator, `..`, a leading dot, a control character, empty)."""
    if not name or _BAD_NAME.search(name) or name.startswith(".") or len(name) > 200:
        raise OutputError(
            f"{where}: name {name!r} cannot name an output file (no '/', '\\', leading "
            "'.', control characters; 1 to 200 characters)"
        )
    return name


def inside(folder: str | Path, path: str | Path) -> bool:
    """Whether `path` lies in `folder` (after resolving both)."""
    f, p = Path(folder).resolve(), Path(path).resolve()
    return p == f or f in p.parents


def recorded(folder: str | Path) -> dict[str, list[str]]:
    """command -> the names (or patterns) the record of `folder` gives it; a line cut by
    a kill is ignored."""
    path = Path(folder) / RECORD
    out: dict[str, list[str]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
            out.setdefault(str(r["command"]), []).extend(str(n) for n in r["files"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def _owned(rel: str, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        if pat.endswith("/") and (rel + "/").startswith(pat):
            return True
        if fnmatch.fnmatchcase(rel, pat):
            return True
    return False


def _existing(folder: Path, name: str) -> list[Path]:
    """The paths in `folder` a declared name (a file, `DIR/`, or a glob pattern) stands for."""
    if name.endswith("/"):
        p = folder / name.rstrip("/")
        return [p] if p.exists() or p.is_symlink() else []
    if any(c in name for c in "*?["):  # dot-files are the record and temporary files
        return sorted(p for p in folder.glob(name) if not p.name.startswith("."))
    p = folder / name
    return [p] if p.exists() or p.is_symlink() else []


def check_outputs(
    folder: str | Path,
    command: str,
    names: Iterable[str],
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    keep_own: bool = False,
    adopt: bool = False,
) -> None:
    """The output rule, checked before any work. `names` are what `command` writes in
    `folder` (relative paths; `DIR/` a folder it fills; glob patterns for names known
    only later). Refused (OutputError): a `folder` that is a file; a name outside
    `folder`; an output that is one of `inputs` (even with `overwrite`); and, unless
    `overwrite`, an existing file the record does not give to `command` (with
    `keep_own`, any existing file: a finished result is replaced only on request).
    `adopt`: the folder is the command's own from a version before the record (a run
    taken up with --resume), read as recorded when it has no record at all."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} exists and is not a folder")
    names = list(names)
    for name in names:
        if not inside(folder, folder / name.rstrip("/")):
            raise OutputError(f"output {folder / name} would be written outside {folder}")
    outs = {(folder / n.rstrip("/")).resolve(): n for n in names if not any(c in n for c in "*?[")}
    for i in inputs:
        if i is not None and Path(i).resolve() in outs:
            raise OutputError(
                f"{i} is an input of this command and its output {outs[Path(i).resolve()]}; "
                "choose another output folder"
            )
    if overwrite or not folder.is_dir():
        return
    record = recorded(folder)
    own = record.get(command, [])
    if adopt and not (folder / RECORD).exists():
        own = names
    for name in names:
        for p in _existing(folder, name):
            rel = p.relative_to(folder).as_posix()
            if keep_own or not _owned(rel, own):
                who = next((c for c, pats in record.items() if _owned(rel, pats)), None)
                by = f"written by maediff {who}" if who else "not written by maediff " + command
                raise OutputError(
                    f"{p} exists ({by}); pass --overwrite to replace it, or choose another "
                    "output folder"
                )


def check_own_folder(folder: str | Path, command: str, marks: Iterable[str] = ()) -> None:
    """For a command that fills its folder whole (benchmark): an existing folder is
    taken only when it is empty, or the record gives it to `command`, or it holds one
    of `marks` (the files that say so in versions before the record)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} exists and is not a folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if command in recorded(folder) or any((folder / m).exists() for m in marks):
        return
    held = sorted(p.name for p in folder.iterdir())
    raise OutputError(
        f"{folder} holds files that maediff {command} did not write ({', '.join(held[:3])}"
        f"{', ...' if len(held) > 3 else ''}); choose a new or empty folder"
    )


def record_outputs(folder: str | Path, command: str, names: Iterable[str]) -> Path:
    """Append to OUT/.maediff-outputs.jsonl that `names` are `command`'s: done before
    they are written, so a killed command's files are still its own on the next call.
    One write of one line (whole, or cut by a kill and ignored)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(set(names))
    if set(names) <= set(recorded(folder).get(command, [])):
        return folder / RECORD
    line = json.dumps({"command": command, "files": names}) + "\n"
    fd = os.open(folder / RECORD, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return folder / RECORD


__all__ = [
    "RECORD",
    "OutputError",
    "apply_umask",
    "check_outputs",
    "check_own_folder",
    "clean_stale",
    "current_umask",
    "inside",
    "record_outputs",
    "recorded",
    "safe_name",
    "exit_with_parent",
    "is_leftover",
    "owner_dead",
    "owner_tag",
    "partial_path",
    "pid_alive",
    "temp_path",
    "write_text_atomic",
]
