"""Host buffers that one async snapshot hands on to the next.

A training loop saves the same tree again and again, so its snapshots need buffers of the same
sizes each time. Fresh memory costs page faults on first touch, and on a VM whose host backs
guest memory lazily that first touch can cost more than the copy itself (about 2 s/GiB on the
2-core VM of ``benchmarks/README.md``, against ~0.1 s/GiB to copy). So when an async save
finishes, its snapshot buffers are kept for the next snapshots: the pool holds at most twice
the bytes of the last save that finished (its non-zero pieces and packs: saves that overlap
need two sets), never more than ``JAXCKPT_ASYNC_HOST_BYTES``; other sizes are allocated anew.
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

    Buffers the pool still holds stay beside them up to twice their bytes (saves that overlap
    need two sets: one being written, one for the next snapshot); older ones go first.
    Nothing is kept past ``limit`` bytes.
    """
    new = sum(b.nbytes for b in buffers)
    cap = min(2 * new, limit)
    global _free
    with _lock:
        kept: dict[int, list[np.ndarray]] = {}
        total = 0
        for b in [*buffers, *(b for bufs in _free.values() for b in bufs)]:
            if total + b.nbytes <= cap:
                kept.setdefault(b.nbytes, []).append(b)
                total += b.nbytes
        _free = kept


def pooled_bytes() -> int:
    """The bytes the pool holds now."""
    with _lock:
        return sum(b.nbytes for bufs in _free.values() for b in bufs)
