"""Who is writing where: locks that die with the process holding them.

A local save holds an exclusive ``flock`` on its temporary directory from the moment it makes
it until it commits or gives up, and a manager that writes a run holds one on the run's
``.jaxckpt-writer`` file. Another process that finds a debris-named directory asks whether its
writer is gone by trying to take the same lock without waiting: it gets it only when no live
process holds it (the kernel drops a process's locks when it dies, ``kill -9`` included), and it
keeps it while it deletes, so a writer can never start over what is being removed. Where the
file system has no ``flock`` (some network file systems), an entry untouched for
``STALE_AFTER`` seconds counts as abandoned.

An object store has no locks: a save's ``PENDING`` object names its writer (host, process id,
start time). A writer on this host is gone when its process is; one on another host when its
``PENDING`` is older than ``STALE_AFTER``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time

from jaxckpt.errors import CheckpointError

STALE_AFTER = 24 * 3600.0
WRITER_FILE = ".jaxckpt-writer"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EINVAL}


class Lock:
    """An exclusive lock held through an open file descriptor (None: the file system has
    none to give; the caller goes on unprotected, as it would have without locks)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None


def _flock(path: str, wait: bool, flags: int = os.O_RDONLY) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or None when another process
    holds it (only without ``wait``). Raises ``OSError`` (``FileNotFoundError`` included)."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file ``fd`` was opened on."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def make_locked_dir(path: str) -> Lock:
    """Makes the directory ``path`` (and its parents) and locks it for the caller's save.

    A process removing debris may take the lock between the two steps and delete the new
    directory: the lock, once ours, is then on a directory no longer at ``path``, and the
    directory is made again.
    """
    for _ in range(8):
        os.makedirs(path, exist_ok=True)
        try:
            fd = _flock(path, wait=True)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno in _NO_FLOCK:
                return Lock(None)
            raise
        assert fd is not None
        if _same(fd, path):
            return Lock(fd)
        os.close(fd)
    raise CheckpointError(
        f"The directory {path} was removed each time it was made: another process keeps "
        "deleting it. Fix: stop whatever removes *.jaxckpt-tmp-* entries there, then save again."
    )


def lock_file(fd: int) -> None:
    """Locks a file the caller just created (a temporary name it will rename): no process
    removing debris takes it for abandoned while it is written."""
    # A new file nobody else can hold yet; where the file system has no locks, it is written
    # unprotected, as it was before locks.
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def claim_abandoned(path: str) -> Lock | None:
    """The lock of the debris-named ``path`` when its writer is gone (hold it while deleting
    ``path``, then release it), or None while a live process writes there (or it is gone)."""
    try:
        fd = _flock(path, wait=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        try:
            old = time.time() - os.stat(path).st_mtime > STALE_AFTER
        except FileNotFoundError:
            return None
        return Lock(None) if old else None
    return None if fd is None else Lock(fd)


# ---------------------------------------------------------------------------- object stores


def owner_record() -> bytes:
    """What a save's ``PENDING`` object holds: who writes there, since when."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    return json.dumps(me).encode()


def owner_gone(pending: bytes) -> bool:
    """Whether the writer named by a ``PENDING`` object's bytes is gone.

    An empty or unreadable ``PENDING`` (older jaxckpt versions wrote it empty) names no one:
    it counts as abandoned, as those versions treated it.
    """
    try:
        owner = json.loads(pending)
        host, pid, since = str(owner["host"]), int(owner["pid"]), float(owner["time"])
    except (ValueError, KeyError, TypeError):
        return True
    if host == socket.gethostname():
        return not _alive(pid)
    return time.time() - since > STALE_AFTER


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------- writing a run


class _Held:
    def __init__(self, lock: Lock):
        self.lock, self.users = lock, 0


_runs: dict[str, _Held] = {}  # the run directories this process writes: one lock each
_runs_lock = threading.Lock()


def hold_run(directory: str) -> str:
    """Takes the writer lock of a run directory (local), shared by this process's managers;
    returns the key that :func:`release_run` takes.

    Raises ``CheckpointError`` at once when another process writes the run: its retention
    would delete checkpoints this one reads, and both would rewrite one index.
    """
    path = os.path.join(directory, WRITER_FILE)
    key = os.path.realpath(path)
    with _runs_lock:
        held = _runs.get(key)
        if held is None:
            held = _runs[key] = _Held(_take_run(path))
        held.users += 1
    return key


def _take_run(path: str) -> Lock:
    try:
        fd = _flock(path, wait=False, flags=os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return Lock(None)
        raise
    if fd is None:
        try:
            with open(path, "rb") as f:
                who = json.loads(f.read() or b"{}")
        except (OSError, ValueError):
            who = {}
        by = f" (process {who.get('pid')} on {who.get('host')})" if who.get("pid") else ""
        directory = os.path.dirname(path)
        raise CheckpointError(
            f"Another process{by} is writing checkpoints to {directory}: two writing managers "
            "on one run would delete each other's checkpoints and rewrite one index. Fix: give "
            "each run its own directory, or open a manager that only reads (an evaluation "
            "job) with CheckpointManager(directory, read_only=True)."
        )
    os.ftruncate(fd, 0)
    os.write(fd, owner_record())
    return Lock(fd)


def release_run(key: str) -> None:
    with _runs_lock:
        held = _runs.get(key)
        if held is None:
            return
        held.users -= 1
        if held.users <= 0:
            held.lock.release()
            del _runs[key]
