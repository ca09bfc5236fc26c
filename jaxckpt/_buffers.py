"""Host buffers that one async snapshot hands on to the next.

A training loop saves the same tree again and again, so its snapshots need buffers of the same
sizes each time. Fresh memory costs page faults on first touch, and on a VM whose host backs
guest memory lazily that first touch can cost more than the copy itself (about 2 s/GiB on the
2-core VM of ``benchmarks/README.md``, against ~0.1 s/GiB to copy). So when an async save
finishes, its snapshot buffers are kept for the next snapshots, with those of earlier saves of
the same sizes: when the disk falls behind and saves overlap, each set that was in flight at
once is kept, so the next pile-up takes no fresh memory either. Buffers of other sizes (of a
tree no longer saved) are let go, and the pool never holds more than
``JAXCKPT_ASYNC_HOST_BYTES``, the bound on what saves in flight hold anyway.
"""

from __future__ import annotations

import threading

import numpy as np

from . import _chunks

_free: dict[int, list[np.ndarray]] = {}  # nbytes -> 64-byte aligned uint8 buffers
_lock = threading.Lock()


def take(nbytes: int) -> np.ndarray:
    """A 64-byte aligned uint8 buffer of ``nbytes`` (its contents are undefined)."""
    with _lock:
        free = _free.get(nbytes)
        if free:
            return free.pop()
    return _chunks.aligned_empty([nbytes], np.dtype(np.uint8))


def give(buffers: list[np.ndarray], limit: int) -> None:
    """Keeps ``buffers`` (a finished snapshot's) for the next snapshots.

    Buffers the pool already holds stay beside them if a snapshot of the same tree could use
    them (same sizes); older ones go first past ``limit`` bytes.
    """
    sizes = {b.nbytes for b in buffers}
    global _free
    with _lock:
        kept: dict[int, list[np.ndarray]] = {}
        total = 0
        for b in [*buffers, *(b for n, bufs in _free.items() if n in sizes for b in bufs)]:
            if total + b.nbytes <= limit:
                kept.setdefault(b.nbytes, []).append(b)
                total += b.nbytes
        _free = kept


def pooled_bytes() -> int:
    """The bytes the pool holds now."""
    with _lock:
        return sum(b.nbytes for bufs in _free.values() for b in bufs)
