"""Async snapshots: the pieces and packs of a planned save, copied into memory the save owns.

``snapshot`` copies into host buffers from :mod:`jaxckpt._runtime` (``take_buffer``) (small leaves straight
into their pack chunks); on an accelerator with room, ``copy_on_device`` copies within the
device's memory instead and ``fetch`` moves those copies to the host in the background. A
piece whose bytes are all zero is kept as a :class:`jaxckpt._memory.Zeros` marker.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _device, _incremental, _memory, _runtime, _write


def snapshot_bytes(arrays: list[_write.Array], packs: list[_write.Pack]) -> int:
    """Host bytes a snapshot holds (before it is taken: at most this; a zero piece holds none,
    nor does a piece an incremental save links)."""
    return sum(
        p.nbytes
        for a in arrays
        for p in a.pieces
        if not isinstance(p.data, (_memory.Zeros, _incremental.Unchanged))
    ) + sum(k.n_chunks * _write.PACK_CHUNK for k in packs)


def copy_on_device(arrays: list[_write.Array]) -> list[_write.Piece]:
    """Copies the pieces held on an accelerator within its own memory, where it has room.

    The caller of an async save then waits for device-to-device copies (memory bandwidth,
    milliseconds for gigabytes), not for the transfer to the host; :func:`fetch` moves the
    copies to the host in the background, which frees them. A device whose free memory is
    under twice its pieces' bytes (or that reports none, like the CPU) is left to
    :func:`snapshot`. Returns the pieces copied.
    """
    by_device: dict[Any, list[_write.Piece]] = {}
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


def fetch(pieces: list[_write.Piece], taken: list[np.ndarray]) -> None:
    """Starts moving the device copies of :func:`copy_on_device` to host memory.

    The fetch threads move them: each device copy is freed once it is on the host, however
    slow the disk, and the next snapshot's copy threads never wait behind them. Each piece's
    data becomes a ``Future`` of its host bytes, which its write waits for, so the first
    writes start while later pieces are still on their way.
    """
    for p in pieces:
        p.data = _runtime.pool("fetch").submit(_host_copy, p.data, taken)


def snapshot(
    arrays: list[_write.Array], packs: list[_write.Pack], skip: Sequence[_write.Piece] = ()
) -> list[np.ndarray]:
    """Copies every piece but ``skip`` to host memory that this save owns (donation-safe).

    The copies run on the copy threads (NumPy releases the GIL while copying), into buffers
    from :mod:`jaxckpt._runtime` (``take_buffer``), which are returned (the caller gives them back once the
    save is done); small leaves are copied straight into the chunks of their pack. A piece
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
    cp = _runtime.pool("copy")
    taken: list[np.ndarray] = []  # list.append is atomic: the copy threads share it
    jobs = [cp.submit(_copy_piece, p, taken) for p in pieces]
    for k in packs:
        k.chunks = list(cp.map(functools.partial(k.chunk, taken=taken), range(k.n_chunks)))
        k.leaves = []
    for j in jobs:
        j.result()
    return taken


def _copy_piece(p: _write.Piece, taken: list[np.ndarray]) -> None:
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
