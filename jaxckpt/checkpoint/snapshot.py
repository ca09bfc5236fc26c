"""Async snapshots: the pieces and packs of a planned save, copied into memory the save owns.

``snapshot`` copies into host buffers from :mod:`jaxckpt.runtime` (``take_buffer``): small
leaves straight into their pack, one buffer per pack, which ``seal_packs`` finishes on the
save's background thread. On an accelerator with room, ``copy_on_device`` copies within the
device's memory instead and ``fetch`` moves those copies to the host in the background. A
piece whose bytes are all zero is kept as a :class:`jaxckpt.memory.Zeros` marker.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import runtime as _runtime
from jaxckpt.checkpoint import device as _device
from jaxckpt.checkpoint import incremental as _incremental
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.checkpoint import write as _write
from jaxckpt.format import checksum as _checksum


def snapshot_bytes(arrays: list[_plan.Array], packs: list[_plan.Pack]) -> int:
    """Host bytes a snapshot holds (before it is taken: at most this; a zero piece holds none,
    nor does a piece an incremental save links)."""
    return sum(
        p.nbytes
        for a in arrays
        for p in a.pieces
        if not isinstance(p.data, (_memory.Zeros, _incremental.Unchanged))
    ) + sum(k.n_chunks * _plan.PACK_CHUNK for k in packs)


def copy_on_device(arrays: list[_plan.Array]) -> list[_plan.Piece]:
    """Copies the pieces held on an accelerator within its own memory, where it has room.

    The caller of an async save then waits for device-to-device copies (memory bandwidth,
    milliseconds for gigabytes), not for the transfer to the host; :func:`fetch` moves the
    copies to the host in the background, which frees them. A device whose free memory is
    under twice its pieces' bytes (or that reports none, like the CPU) is left to
    :func:`snapshot`. Returns the pieces copied.
    """
    by_device: dict[Any, list[_plan.Piece]] = {}
    for a in arrays:
        for p in a.pieces:
            if isinstance(p.data, jax.Array):
                by_device.setdefault(next(iter(p.data.devices())), []).append(p)
    chosen = [
        p
        for d, ps in by_device.items()
        if _device_has_room(d, sum(p.nbytes for p in ps))
        for p in ps
    ]
    try:
        copies = jax.block_until_ready([jnp.copy(p.data) for p in chosen])
    except Exception:  # out of device memory after all (another process, say): host snapshot
        return []
    for p, c in zip(chosen, copies, strict=True):
        p.data = c
    return chosen


def _device_has_room(device: Any, nbytes: int) -> bool:
    """Whether ``device`` is an accelerator with ``2 * nbytes`` of free memory."""
    if device.platform == "cpu":
        return False  # a copy on the CPU is the host copy itself
    try:
        stats = device.memory_stats() or {}
    except Exception:  # a backend without memory statistics
        return False
    if "bytes_limit" not in stats:
        return False
    return 2 * nbytes <= stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def fetch(pieces: list[_plan.Piece], taken: list[np.ndarray]) -> None:
    """Starts moving the device copies of :func:`copy_on_device` to host memory.

    The fetch threads move them: each device copy is freed once it is on the host, however
    slow the disk, and the next snapshot's copy threads never wait behind them. Each piece's
    data becomes a ``Future`` of its host bytes, which its write waits for, so the first
    writes start while later pieces are still on their way.
    """
    for p in pieces:
        p.data = _runtime.pool("fetch").submit(_host_copy, p.data, taken)


def snapshot(
    arrays: list[_plan.Array], packs: list[_plan.Pack], skip: Sequence[_plan.Piece] = ()
) -> list[np.ndarray]:
    """Copies every piece but ``skip`` to host memory that this save owns (donation-safe).

    The copies run on the copy threads (NumPy releases the GIL while copying), into buffers
    from :mod:`jaxckpt.runtime` (``take_buffer``), which are returned (the caller gives them back once the
    save is done); small leaves are copied straight into their pack (one buffer). A piece
    whose bytes are all zero is not copied: a :class:`_memory.Zeros` marker takes its place.
    Nor is one an incremental save links (:class:`_incremental.Unchanged`: an immutable array).
    """
    skipped = {id(p) for p in skip}
    pieces = [
        p
        for a in arrays
        for p in a.pieces
        if id(p) not in skipped and not isinstance(p.data, _incremental.Unchanged)
    ]
    # Pieces on an accelerator without room for device copies: moved to the host together.
    on_device = [p for p in pieces if _write._on_accelerator(p.data)]
    moved = {id(p) for p in on_device}
    cp = _runtime.pool("copy")
    taken: list[np.ndarray] = []  # list.append is atomic: the copy threads share it
    jobs = [cp.submit(_copy_piece, p, taken) for p in pieces if id(p) not in moved]
    hosts = _device.to_host_many([p.data for p in on_device])
    jobs += [cp.submit(_own_host, p, h) for p, h in zip(on_device, hosts, strict=True)]
    for k in packs:
        _copy_pack(k, taken)
    for j in jobs:
        j.result()
    return taken


def _own_host(p: _plan.Piece, host: np.ndarray) -> None:
    """A piece's fresh host copy becomes its data (a ``Zeros`` marker if all zero)."""
    p.data = _memory.Zeros(host.shape, host.dtype) if _memory.is_zero(host) else host


def _copy_pack(k: _plan.Pack, taken: list[np.ndarray]) -> None:
    """Copies a pack's leaves into one buffer, each at its offset; its chunks are views of it.

    Only the copies are made here, in the caller's time: the alignment gaps are zeroed and
    each leaf's checksum taken by :func:`seal_packs`, on the save's background thread. The
    leaves are split into up to ``COPY_SPLIT`` runs of about equal bytes, copied on the copy
    threads, when they are large enough for that to pay: NumPy lets go of the GIL while it
    copies, but the Python around each leaf's copy holds it, so threads copying many small
    leaves only take turns (and hand the GIL back and forth).
    """
    buf = _runtime.take_buffer(k.n_chunks * _plan.PACK_CHUNK)
    taken.append(buf)
    runs_of = min(COPY_SPLIT, 1 + k.nbytes // (max(1, len(k.starts)) * COPY_SPLIT_LEAF))
    cuts = _cuts(k.starts, k.nbytes, runs_of)
    runs = [(k.starts[lo:hi], k.leaves[lo:hi]) for lo, hi in itertools.pairwise(cuts)]
    cp = _runtime.pool("copy")
    jobs = [cp.submit(_copy_run, buf, starts, leaves) for starts, leaves in runs[1:]]
    if runs:
        _copy_run(buf, *runs[0])
    for j in jobs:
        j.result()
    k.whole = buf
    k.chunks = [buf[i : i + _plan.PACK_CHUNK] for i in range(0, buf.size, _plan.PACK_CHUNK)]
    k.leaves = []


def _copy_piece(p: _plan.Piece, taken: list[np.ndarray]) -> None:
    p.data = _host_copy(p.data, taken)


def _host_copy(data: Any, taken: list[np.ndarray]) -> np.ndarray | _memory.Zeros:
    """A host copy of ``data`` this save owns (a ``Zeros`` marker if its bytes are all zero)."""
    if _write._on_accelerator(data):
        host = _device.to_host(data)  # a fresh host copy already
        return _memory.Zeros(host.shape, host.dtype) if _memory.is_zero(host) else host
    src = _write._to_host(data, copy=False)
    if src.flags.c_contiguous and _memory.is_zero(src):
        return _memory.Zeros(src.shape, src.dtype)
    buf = _runtime.take_buffer(src.nbytes)
    taken.append(buf)
    dst = buf.view(src.dtype).reshape(src.shape)
    np.copyto(dst, src)
    return dst


COPY_SPLIT = 4  # runs a pack's copy is split into (the calling thread takes the first)
COPY_SPLIT_LEAF = 256 << 10  # the mean leaf size from which a pack's copy is split in runs


def _cuts(starts: list[int], nbytes: int, n: int) -> list[int]:
    """Indices cutting ``starts`` into at most ``n`` runs of about equal bytes: [0, ..., len]."""
    out = [0]
    for j in range(1, n):
        i = bisect.bisect_left(starts, nbytes * j // n)
        if out[-1] < i < len(starts):
            out.append(i)
    out.append(len(starts))
    return out


def _copy_run(buf: np.ndarray, starts: list[int], leaves: list[Any]) -> None:
    """Copies ``leaves`` into ``buf`` at ``starts`` (the per-leaf Python kept to a minimum)."""
    for start, x in zip(starts, leaves, strict=True):
        a = x if type(x) is np.ndarray else np.asarray(x)
        raw = a.reshape(-1).view(np.uint8)  # reshape copies a non-contiguous array first
        buf[start : start + raw.size] = raw


def seal_packs(packs: list[_plan.Pack]) -> None:
    """Finishes the snapshots of :func:`_copy_pack` once the leaf records are bound: zeroes
    the alignment gaps and the tail, and takes each leaf's checksum (for reading it alone)."""
    for k in packs:
        buf = k.whole
        if buf is None:
            continue
        end = 0
        for start, rec in zip(k.starts, k.records, strict=True):
            if start > end:
                buf[end:start] = 0
            end = start + rec["packed"][1]
            rec["crc32c"] = _checksum.crc32c(buf[start:end])
        buf[end:] = 0
        k.whole = None
