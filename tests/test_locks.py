"""benchmark/locks.py: the lock between processes filling one benchmark folder, with
flock and, on a file system that refuses flock (Lustre, NFS without lock support),
with an exclusively created lock file."""

import errno
import fcntl
import socket
import subprocess
import sys
import threading
import time

import pytest

from maediff.benchmark import locks
from maediff.benchmark.locks import file_lock, held_path, run_lock


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock: every flock call fails as Lustre's does."""
    calls = []

    def refuse(f, op):
        calls.append(op)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    return calls


def test_flock_excludes_a_second_holder(tmp_path):
    with file_lock(tmp_path / ".lock") as first:
        with file_lock(tmp_path / ".lock") as second:
            assert (first, second) == (True, False)
    with file_lock(tmp_path / ".lock") as again:
        assert again


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_without_flock_a_lock_file_holds_the_lock(tmp_path, monkeypatch, code):
    def refuse(f, op):
        raise OSError(code, "not supported")

    monkeypatch.setattr(fcntl, "flock", refuse)
    held = held_path(tmp_path / "run" / ".lock")
    with run_lock(tmp_path / "run") as first:
        assert first
        assert held.read_text().split() == [socket.gethostname(), str(locks.os.getpid())]
        with run_lock(tmp_path / "run") as second:  # another process's view: held
            assert not second
        assert held.exists()  # the refused one leaves the holder's file alone
    assert not held.exists()  # released
    with run_lock(tmp_path / "run") as again:
        assert again


def test_a_lock_file_of_a_dead_process_is_stale_and_taken(tmp_path, no_flock):
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(child.stdout)
    held = held_path(tmp_path / ".lock")
    held.write_text(f"{socket.gethostname()} {dead}\n")
    with file_lock(tmp_path / ".lock") as mine:
        assert mine
        assert held.read_text().split()[1] == str(locks.os.getpid())
    assert no_flock  # the fallback was taken because flock failed


def test_a_lock_file_of_another_host_or_a_live_process_is_kept(tmp_path, no_flock):
    held = held_path(tmp_path / ".lock")
    for owner in (
        f"{socket.gethostname()}-other-node 1",
        f"{socket.gethostname()} {locks.os.getpid()}",
    ):
        held.write_text(owner + "\n")
        with file_lock(tmp_path / ".lock") as mine:
            assert not mine
        assert held.read_text() == owner + "\n"


def test_a_waiting_process_gets_the_lock_file_when_it_is_released(tmp_path, no_flock, monkeypatch):
    monkeypatch.setattr(locks, "POLL_S", 0.01)
    order = []

    def hold():
        with file_lock(tmp_path / ".lock", wait=True):
            order.append("first")
            time.sleep(0.1)
            order.append("first done")

    t = threading.Thread(target=hold)
    t.start()
    while not order:
        time.sleep(0.005)
    with file_lock(tmp_path / ".lock", wait=True) as mine:
        order.append("second")
        assert mine
    t.join()
    assert order == ["first", "first done", "second"]


def test_a_busy_flock_is_not_mistaken_for_a_missing_one(tmp_path, monkeypatch):
    """BlockingIOError (held by another) keeps its meaning: no lock file is made."""

    def busy(f, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "busy")

    monkeypatch.setattr(fcntl, "flock", busy)
    with file_lock(tmp_path / ".lock") as mine:
        assert not mine
    assert not held_path(tmp_path / ".lock").exists()
