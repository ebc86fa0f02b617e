"""Exclusive locks between the processes that fill one benchmark folder (a job array
on a cluster, or several GPUs of one machine).

    with file_lock(out / ".data.lock", wait=True):   # held: the others wait
        ...
    with run_lock(folder) as mine:                   # not waited for
        if not mine: ...                             # another process runs it

The lock is `flock` on the file, released by the operating system when the process
dies. Some shared file systems (Lustre or NFS mounted without lock support) refuse
`flock` with an error other than "held by another" (ENOLCK, EOPNOTSUPP, ENOSYS): the
lock is then a file created exclusively beside it, `<name>.held`, which holds the
host and process id of its owner and is removed on release. A `.held` file left by
a process of this host that no longer exists is stale and removed; one from another
host cannot be checked from here: it keeps the lock until it is deleted by hand
(the message of `run_lock`'s caller names the folder).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

POLL_S = 0.2  # how often a waiting process looks at a `.held` lock again


@contextmanager
def file_lock(path: Path, wait: bool = False) -> Iterator[bool]:
    """An exclusive lock on `path`; yields whether it is held (always, with `wait`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:  # no flock on this file system: the lock file instead
            with held_file_lock(held_path(path), wait) as mine:
                yield mine
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_lock(folder: Path) -> AbstractContextManager[bool]:
    """An exclusive lock on a run folder, not waited for: yields False when another
    process holds it."""
    return file_lock(folder / ".lock")


# ------------------------------------------------------------------ without flock


def held_path(path: Path) -> Path:
    return path.with_name(path.name + ".held")


def owner_text() -> str:
    return f"{socket.gethostname()} {os.getpid()}\n"


@contextmanager
def held_file_lock(path: Path, wait: bool = False) -> Iterator[bool]:
    """The lock as a file created with O_CREAT | O_EXCL (atomic on NFS v3+ and Lustre),
    holding "HOST PID"; yields whether it is held."""
    while not _try_create(path):
        if _remove_if_stale(path):
            continue
        if not wait:
            yield False
            return
        time.sleep(POLL_S)
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(owner_text())
    return True


def _remove_if_stale(path: Path) -> bool:
    """Removes a `.held` file whose owner was a process of this host that is gone;
    True when removed (or gone already)."""
    try:
        host, pid = path.read_text().split()
        pid_n = int(pid)
    except FileNotFoundError:
        return True  # released between our two looks
    except (OSError, ValueError):
        return False  # being written, or not ours to judge: held
    if host != socket.gethostname() or pid_alive(pid_n):
        return False
    path.unlink(missing_ok=True)
    return True


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


__all__ = ["file_lock", "held_file_lock", "run_lock"]
