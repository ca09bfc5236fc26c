"""Restoring replicated data: each part read once, by one process, and broadcast to the others.

Restoring an array that every process needs whole (a replicated target, or a NumPy target,
which every process gets whole) makes each of P processes read all of it: P times its bytes
from a shared store. Here its chunks are dealt out among the processes (the same dealing as a
save's, :func:`jaxckpt.checkpoint.shares.deal`): each process reads its share of the chunks, then one
all-gather over the job's connection (JAX's collectives: NCCL/ICI on accelerators, Gloo on
CPUs) gives every process all the bytes. Each process reads about 1/P.

Which leaves: an array leaf of at least ``MIN_BYTES`` that every process of the job restores
whole (a fully replicated target sharding over devices of every process, or a target local to
each process: NumPy, a single device, no sharding). Sharded and partly replicated targets are
read directly: each process reads only its own slices, which is already no more than it needs.

When: ``$JAXCKPT_BROADCAST``: ``auto`` (default) broadcasts from object stores (``gs://``,
``s3://``), where every byte read is a request over the network, in a job on accelerators,
whose collectives run over NCCL or ICI; a local or shared file system path reads directly (its
page cache and client caches serve repeated reads), and so do CPU-only jobs (their collectives
run over Gloo's TCP, far slower than a read: docs/speed.md). ``1`` broadcasts from any store,
``0`` never.

Every process must restore the same leaves with the same targets (as multihost.md asks): they
all join each all-gather, in the same order. A process that fails to read its share still
joins it, with a failure flag, so that every process raises together instead of waiting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import shares as _shares
from jaxckpt.errors import CoordinationError
from jaxckpt.format.metadata import Record
from jaxckpt.storage import chunk_files as _chunks

ENV = "JAXCKPT_BROADCAST"
MIN_BYTES = 1 << 20  # smaller leaves are read directly: their reads cost little
ROUND_BYTES = 512 << 20  # bytes gathered at a time (each process holds all of a round's)
_HEADER = 64  # a process's status byte, padded: the gathered bytes after it stay aligned


def mode() -> str:
    """``auto``, ``always`` or ``never``, from ``$JAXCKPT_BROADCAST``."""
    raw = os.environ.get(ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on", "always"):
        return "always"
    if raw in ("0", "false", "no", "off", "never"):
        return "never"
    raise ValueError(
        f"{ENV}={raw!r} is not one of auto, 1 or 0. Fix: set {ENV}=1 to read replicated arrays "
        f"once and broadcast them, {ENV}=0 to read them in every process, or unset it (auto)."
    )


def wanted(path: str) -> bool:
    """Whether a restore of ``path`` broadcasts the replicated leaves it restores."""
    if _multihost.process_count() == 1:
        return False
    m = mode()
    if m != "auto":
        return m == "always"
    # CPU processes gather over Gloo (TCP), slower than reading even from a local disk.
    return _storage.at(path).os_path() is None and jax.devices()[0].platform != "cpu"


def everywhere(rec: Record, sharding: Any) -> bool:
    """Whether every process restores the array ``rec`` whole onto ``sharding`` (None: a
    NumPy target), and it is large enough to broadcast."""
    if "key" in rec or "packed" in rec:
        return False
    nbytes = math.prod(rec["shape"]) * np.dtype(rec.get("stored", rec["dtype"])).itemsize
    if nbytes < MIN_BYTES:
        return False
    if sharding is None:
        return True
    devices = sharding.device_set
    if all(d.process_index == _multihost.process_index() for d in devices):
        return len(devices) == 1 or sharding.is_fully_replicated  # local to each process
    processes = {d.process_index for d in devices}
    return sharding.is_fully_replicated and len(processes) == _multihost.process_count()


def read_many(
    reader: Any,
    requests: Sequence[tuple[str, Any]],
    candidates: Sequence[int],
    then: Callable[[int, np.ndarray], Any],
) -> list[Any]:
    """``reader.read_many(requests, then=then)``, the ``candidates`` (requests every process
    makes, whole) read once and broadcast."""
    shared = list(candidates)  # chosen by the caller, where :func:`wanted`
    if not shared:
        return reader.read_many(requests, then=then)
    out: list[Any] = [None] * len(requests)
    for i, arr in _gathered(reader, [(i, requests[i][0]) for i in shared]).items():
        out[i] = then(i, arr)
    rest = [i for i in range(len(requests)) if out[i] is None]
    got = reader.read_many([requests[i] for i in rest], then=lambda j, a: then(rest[j], a))
    for i, arr in zip(rest, got, strict=True):
        out[i] = arr
    return out


def _gathered(reader: Any, wanted: list[tuple[int, str]]) -> dict[int, np.ndarray]:
    """The whole arrays at the paths ``wanted``, each chunk read by one process, gathered."""
    units: list[tuple[int, str, tuple[slice, ...], int]] = []  # (request, path, chunk, bytes)
    outs: dict[int, np.ndarray] = {}
    for i, path in wanted:
        rec = reader.record(path)
        shape, dtype = tuple(rec["shape"]), np.dtype(rec["dtype"])
        outs[i] = _memory.aligned_empty(list(shape), dtype)
        if not outs[i].size:
            continue
        whole = tuple(slice(0, n) for n in shape)
        for _, local, _ in _chunks.piece_chunks(shape, rec["chunks"], whole) or [
            ((), whole, False)
        ]:
            nbytes = math.prod(s.stop - s.start for s in local) * dtype.itemsize
            units.append((i, path, local, nbytes))
    done = 0
    while done < len(units):  # rounds of at most ROUND_BYTES
        end, total = done, 0
        while end < len(units) and (end == done or total + units[end][3] <= ROUND_BYTES):
            total += units[end][3]
            end += 1
        _round(reader, units[done:end], outs)
        done = end
    return outs


def _round(
    reader: Any, units: list[tuple[int, str, Any, int]], outs: dict[int, np.ndarray]
) -> None:
    from jax.experimental import multihost_utils

    n, me = _multihost.process_count(), _multihost.process_index()
    load = [0] * n
    owner = _shares.deal([u[3] for u in units], [range(n)] * len(units), load)
    width = _HEADER + max(load)
    buf = np.zeros(width, np.uint8)
    mine = [u for u, p in zip(units, owner, strict=True) if p == me]
    error: BaseException | None = None
    try:
        got = reader.read_many([(path, local) for _, path, local, _ in mine])
        at = _HEADER
        for (_, _, _, nbytes), arr in zip(mine, got, strict=True):
            buf[at : at + nbytes] = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            at += nbytes
    except Exception as e:  # still joins the gather: the others must not wait for it
        error = e
        buf[0] = 1
    every = np.asarray(multihost_utils.process_allgather(buf))  # (processes, width)
    failed = [p for p in range(n) if every[p, 0]]
    if error is not None:
        raise error
    if failed:
        raise CoordinationError(
            f"jaxckpt: the restore of {reader.path} failed on process {failed[0]} while it read "
            "its share of the replicated arrays (each part is read by one process and sent to "
            "the others). Fix: see that process's log for the cause; "
            f"{ENV}=0 makes every process read the replicated arrays itself."
        )
    offsets = [_HEADER] * n
    for (i, _, local, nbytes), p in zip(units, owner, strict=True):
        part = outs[i][local]
        start = offsets[p]
        part[...] = every[p, start : start + nbytes].view(part.dtype).reshape(part.shape)
        offsets[p] += nbytes
