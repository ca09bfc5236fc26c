"""Everything jaxckpt keeps for the life of the process, in one place.

- **Worker pools** (:func:`pool`): threads for file writes, reads, snapshot copies, device
  fetches, async saves and a manager's background work, sized from the core count unless
  :func:`set_pool_sizes` says otherwise.
- **Snapshots in progress** (:func:`writes_paused`): file writes of earlier saves wait while the
  training loop waits for a snapshot.
- **Async saves in flight**: the handles not yet waited for (an error nobody waited for is
  raised by the next save), the latest one (saves write in call order), and the bound on host
  memory their snapshots hold (:func:`async_host_bytes`, ``JAXCKPT_ASYNC_HOST_BYTES``).
- **Snapshot buffers** one async save hands on to the next (:func:`take_buffer`).
- **The TensorStore context** and the storage options of ``jc.set_storage_options``.
- **Exit hooks** (:func:`at_exit`): saves in flight commit when a script ends. They use
  ``atexit``; the pools' threads are daemon threads, so they still run when ``atexit`` does
  (the interpreter joins only non-daemon threads before it).

:func:`reset` brings all of it back to a fresh process's state (for tests). Settings are read
from the environment, never written to it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import tensorstore as ts

from jaxckpt.memory import aligned_empty

# ---------------------------------------------------------------------------- worker pools


class Pool:
    """Worker threads that all start with the pool and stay.

    A pool that started a worker only when no idle one took a job made an async save call wait
    for ``Thread.start`` (the new thread must run first) when saves first overlapped.
    """

    def __init__(self, name: str, n: int):
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        self._jobs.put((done, fn, args))
        return done

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        """``fn`` over the items, all submitted at once; the results in order."""
        jobs = [self.submit(fn, *args) for args in zip(*iterables, strict=True)]
        return (job.result() for job in jobs)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            done, fn, args = job
            if not done.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for it
                done.set_exception(e)
            else:
                done.set_result(result)
            del job, done, fn, args  # nothing of a finished job stays referenced here

    def close(self) -> None:
        """Lets the workers end once the jobs already submitted are done."""
        for _ in self.threads:
            self._jobs.put(None)


def _default_sizes() -> dict[str, int]:
    cores = os.cpu_count() or 1
    io = min(32, max(8, 2 * cores))  # os calls release the GIL: more threads than cores
    return {"write": io, "read": io, "save": 8, "copy": max(4, cores), "fetch": 4, "manager": 1}


_sizes = _default_sizes()
_pools: dict[str, Pool] = {}
_pools_lock = threading.Lock()


def pool(kind: str) -> Pool:
    """The shared workers of one kind.

    ``"write"`` writes and syncs files, ``"read"`` reads them, ``"copy"`` takes async
    snapshots and ``"fetch"`` moves an async snapshot taken on an accelerator to the host:
    neither a snapshot nor a read (a restore, a manager looking at a checkpoint) queues
    behind the writes, or the device-to-host transfers, of a save still in flight. ``"save"``
    runs each async save's background work, one worker per save in flight (more wait in
    call order, as they would behind the writes of the saves before them anyway); ``"manager"``
    deletes the checkpoints a manager retired and rewrites its index, one after another.
    """
    got = _pools.get(kind)
    if got is not None:
        return got
    with _pools_lock:
        if kind not in _pools:
            _pools[kind] = Pool(f"jaxckpt-{kind}", _sizes[kind])
        return _pools[kind]


def set_pool_sizes(**sizes: int) -> None:
    """Sets how many workers pools have (``write=16, read=16``...); a pool already started is
    replaced once the jobs it has are done."""
    unknown = set(sizes) - set(_sizes)
    if unknown or not all(isinstance(n, int) and n >= 1 for n in sizes.values()):
        raise ValueError(f"pool sizes are positive ints of the kinds {sorted(_sizes)}: {sizes}")
    with _pools_lock:
        _sizes.update(sizes)
        for kind in sizes:
            old = _pools.pop(kind, None)
            if old is not None:
                old.close()


# ---------------------------------------------------------------------------- snapshots

_snapshots = 0  # async snapshots being taken now
_snapshots_cv = threading.Condition()


@contextlib.contextmanager
def writes_paused() -> Iterator[None]:
    """While a snapshot is taken, file writes (of earlier saves still in flight) wait.

    The training loop waits for the snapshot, and on a host with few cores the writes' copies
    into the page cache would take CPU time from it.
    """
    global _snapshots
    with _snapshots_cv:
        _snapshots += 1
    try:
        yield
    finally:
        with _snapshots_cv:
            _snapshots -= 1
            _snapshots_cv.notify_all()


def after_snapshots() -> None:
    """Returns once no snapshot is being taken (a file write calls it before each step)."""
    if _snapshots:
        with _snapshots_cv:
            _snapshots_cv.wait_for(lambda: _snapshots == 0)


def snapshots_in_progress() -> int:
    return _snapshots


# ---------------------------------------------------------------------------- async saves

unfinished: set[Any] = set()  # the SaveHandles not yet waited for
last: Any = None  # the latest save_async's handle: the next one writes after it
order = threading.Lock()  # guards ``last``
_held = 0  # host bytes the snapshots of saves in flight hold
_held_cv = threading.Condition()


def async_host_bytes() -> int:
    """The bound on host bytes held by async saves in flight (``JAXCKPT_ASYNC_HOST_BYTES``;
    by default a quarter of the host's memory, at least 1 GiB)."""
    env = os.environ.get("JAXCKPT_ASYNC_HOST_BYTES")
    if env:
        return int(env)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1 << 30, total // 4)


def reserve(n: int) -> None:
    """Waits until ``n`` more held bytes fit under the bound (or nothing else is held)."""
    global _held
    limit = async_host_bytes()
    with _held_cv:
        _held_cv.wait_for(lambda: _held == 0 or _held + n <= limit)
        _held += n


def release(n: int) -> None:
    global _held
    with _held_cv:
        _held -= n
        _held_cv.notify_all()


def held_bytes() -> int:
    return _held


# ---------------------------------------------------------------------------- buffers
# A training loop saves the same tree again and again, so its snapshots need buffers of the
# same sizes each time. Fresh memory costs page faults on first touch, and on a VM whose host
# backs guest memory lazily that first touch can cost more than the copy itself (see
# docs/speed.md). So an async save's snapshot buffers are kept for the next snapshots, with
# those of earlier saves of the same sizes: when saves overlap, each set that was in flight at
# once is kept. Buffers of other sizes are let go, and the pool never holds more than
# ``async_host_bytes()``, the bound on what saves in flight hold anyway.

_free: dict[int, list[np.ndarray]] = {}  # nbytes -> 64-byte aligned uint8 buffers
_free_lock = threading.Lock()


def take_buffer(nbytes: int) -> np.ndarray:
    """A 64-byte aligned uint8 buffer of ``nbytes`` (its contents are undefined)."""
    with _free_lock:
        free = _free.get(nbytes)
        if free:
            return free.pop()
    return aligned_empty([nbytes], np.dtype(np.uint8))


def give_buffers(buffers: list[np.ndarray]) -> None:
    """Keeps ``buffers`` (a finished snapshot's) for the next snapshots; buffers already kept
    stay beside them if of the same sizes, older ones going first past the bound."""
    global _free
    limit = async_host_bytes()
    sizes = {b.nbytes for b in buffers}
    with _free_lock:
        kept: dict[int, list[np.ndarray]] = {}
        total = 0
        for b in [*buffers, *(b for n, bufs in _free.items() if n in sizes for b in bufs)]:
            if total + b.nbytes <= limit:
                kept.setdefault(b.nbytes, []).append(b)
                total += b.nbytes
        _free = kept


def pooled_bytes() -> int:
    """The bytes of snapshot buffers kept now."""
    with _free_lock:
        return sum(b.nbytes for bufs in _free.values() for b in bufs)


# ---------------------------------------------------------------------------- TensorStore

_context: ts.Context | None = None
storage_options: dict[str, dict[str, Any]] = {"s3": {}, "gs": {}}


def context() -> ts.Context:
    """One shared TensorStore context: one cache pool and one I/O concurrency limit."""
    global _context
    if _context is None:
        _context = ts.Context(
            {"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": "shared"}}
        )
    return _context


# ---------------------------------------------------------------------------- exit and reset


def at_exit(fn: Callable[..., Any], *args: Any) -> None:
    """Runs ``fn(*args)`` when the interpreter exits, while the pools still work (hooks run
    in reverse order of registration: a manager's before the saves' own)."""
    atexit.register(fn, *args)


def reset() -> None:
    """Back to a fresh process's state: waits for the saves in flight (their errors are
    dropped), lets go of kept buffers, the TensorStore context and the storage options."""
    global last, _context, _free, _held
    for h in list(unfinished):
        with contextlib.suppress(BaseException):
            h.wait()
    unfinished.clear()
    last = None
    with _free_lock:
        _free = {}
    with _held_cv:
        _held = 0
    _context = None
    for scheme in storage_options:
        storage_options[scheme] = {}
