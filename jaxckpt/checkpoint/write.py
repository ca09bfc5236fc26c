"""Writing a save's plan (:mod:`jaxckpt.checkpoint.plan`): the arrays' chunks, the packs of
small leaves, the group metadata, then making them durable.

``write_arrays`` writes the chunks directly as zarr chunk files on a local disk and through
TensorStore elsewhere. A single-process save to a local disk leaves all-zero chunks unwritten
and lists them in the leaf record (``"zero_chunks"``); an async snapshot keeps an all-zero
piece as a :class:`_memory.Zeros` marker instead of a copy.
"""

from __future__ import annotations

import functools
import math
import os
from collections import deque
from concurrent.futures import Future
from typing import Any

import jax
import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import progress as _progress
from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import device as _device
from jaxckpt.checkpoint import incremental as _incremental
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.checkpoint import shares as _shares
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format import split as _split
from jaxckpt.format.metadata import Record
from jaxckpt.log import phase
from jaxckpt.storage import arrays as _arrays
from jaxckpt.storage import chunk_files as _chunks

# Host bytes a synchronous save holds in flight (device-to-host copies not yet on disk).
STREAM_BYTES = 512 << 20
PACK_FLIGHT = 32 << 20  # pack chunks a synchronous save builds ahead of the writes


def group_files(node: Record, moved: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A group ``zarr.json`` for each inner node but the root, keeping the records ``moved``
    there by :func:`jaxckpt.format.split.split`."""
    files: dict[str, Any] = {}
    if node["t"] in _metadata.LEAF_KINDS:
        return files
    if prefix:
        attrs = _split.group_attributes(moved[prefix]) if prefix in moved else None
        files[f"{prefix}/zarr.json"] = _arrays.group_json(attrs)
    for kind, key, child in node["c"]:
        name = _paths.name_of(kind, key)
        files.update(group_files(child, moved, f"{prefix}/{name}" if prefix else name))
    return files


def _on_accelerator(data: Any) -> bool:
    """Whether ``data`` is a ``jax.Array`` outside host memory (its host copy is fresh)."""
    return isinstance(data, jax.Array) and next(iter(data.devices())).platform != "cpu"


def _to_host(data: Any, copy: bool) -> np.ndarray:
    if isinstance(data, Future):  # a device copy on its way to the host (fetch)
        data = data.result()
    if isinstance(data, _shares.Part):  # a chunk of a shard (written by a share of replicas)
        data = data.host()
    if isinstance(data, _memory.Zeros):
        return data.array()
    if isinstance(data, np.ndarray):
        return np.array(data, copy=True) if copy else data
    if _on_accelerator(data):
        return _device.to_host(data)  # a fresh host copy already
    arr = np.asarray(data)
    # On the CPU backend np.asarray may alias the device buffer: a snapshot must own its bytes.
    return np.array(arr, copy=True) if copy and not arr.flags.owndata else arr


@phase("save: wrote the arrays")
def write_arrays(
    root: str,
    arrays: list[_plan.Array],
    packs: list[_plan.Pack],
    budget: int,
    linker: _incremental.Linker | None = None,
) -> None:
    """Writes every array and pack, keeping at most ``budget`` device bytes in host flight.

    Where the store hands out file paths (a local disk), the chunk files are written there
    directly by the I/O threads (made durable by :func:`durable`); elsewhere TensorStore writes
    them. A single-process save to a local disk skips all-zero chunks and lists them in each
    array's record (multi-process saves: process 0 writes the records but not the other
    processes' chunks). With a ``linker`` (a local save) chunks unchanged since its base are
    linked, not written.
    """
    store = _storage.at(root)
    files = store.os_path()
    if files is None:  # a store without files: TensorStore writes every array
        _write_arrays_ts(root, arrays, budget)
        for k in packs:
            whole = np.concatenate([k.chunk(i) for i in range(k.n_chunks)])[: k.nbytes]
            array = _result(root, k.loc, store.open_array(k.loc, k.meta, create=True))
            _result(root, k.loc, array.write(whole))
        return
    w = _FileWrites(root, files, linker)
    if _multihost.is_primary():  # process 0 writes each array's zarr.json
        for loc, meta in [(a.loc, a.meta) for a in arrays] + [(k.loc, k.meta) for k in packs]:
            path = os.path.join(files, loc, "zarr.json")
            w.jobs.append((w.io.submit(_chunks.write_json, path, meta), 0, None))
    for a in arrays:
        w.array(a, budget)
    for k in packs:
        w.pack(k, budget)
    w.finish()
    if w.fallback:  # TensorStore writes every chunk of these, zeros included
        _write_arrays_ts(root, list(w.fallback.values()), budget)
    for a in arrays:
        if id(a) in w.zeros and id(a) not in w.fallback:
            a.record["zero_chunks"] = _zero_list(a.meta, w.zeros[id(a)])


class _FileWrites:
    """The chunk files of one save written with ``os`` calls on the I/O threads (a local
    disk): the writes in flight, the bytes they hold, and what they found (the all-zero chunks
    left out; the arrays a linker could not write, for TensorStore)."""

    def __init__(self, root: str, files: str, linker: _incremental.Linker | None):
        self.root, self.files, self.linker = root, files, linker
        self.io = _runtime.pool("write")
        self.bar = _progress.current()
        self.jobs: deque[tuple[Any, int, _plan.Array | str | None]] = deque()
        self.held = 0
        self.fallback: dict[int, _plan.Array] = {}
        self.zeros: dict[int, list[tuple[int, ...]]] = {}
        self.skip_zeros = _multihost.process_count() == 1
        self.put = linker.put if linker is not None else _chunks.write_chunk

    def settle(self, owner: _plan.Array | str | None, result: Any) -> None:
        if not isinstance(owner, _plan.Array):
            return
        if result is None:
            self.fallback[id(owner)] = owner
        elif result:
            self.zeros.setdefault(id(owner), []).extend(result)

    def queue(self, job: Future[Any], cost: int, owner: _plan.Array | str, bound: int) -> None:
        """Adds a write costing ``cost`` bytes in flight; waits for the oldest past ``bound``."""
        self.jobs.append((job, cost, owner))
        self.held += cost
        while self.held > bound and self.jobs:
            done, n, first = self.jobs.popleft()
            self.settle(first, _wrap_os(self.root, first, done.result))
            self.held -= n

    def array(self, a: _plan.Array, budget: int) -> None:
        """Queues the writes of ``a``'s pieces (or their links)."""
        m = a.meta
        for p in a.pieces:
            if math.prod(m["shape"]) == 0:
                continue
            write = functools.partial(
                _chunks.write_piece,
                self.files,
                a.loc,
                m["data_type"],
                m["chunk_grid"]["configuration"]["chunk_shape"],
                m["shape"],
                p.index,
                _host_of(p.data),
                self.skip_zeros,
                self.put,
            )
            # Decided before the job runs: a piece it cannot link becomes its array again.
            cost = 0 if isinstance(p.data, (np.ndarray, _memory.Zeros)) else p.nbytes
            if isinstance(p.data, _incremental.Unchanged):  # linked, else written from the array
                cost = 0
                job = self.io.submit(self.linker.piece, a.loc, m, p, write)  # type: ignore[union-attr]
            else:
                job = self.io.submit(write)
            self.bar.after(job, p.nbytes)
            self.queue(job, cost, a, budget)

    def pack(self, k: _plan.Pack, budget: int) -> None:
        """Queues the writes of a pack's chunks, built here, on one thread: I/O threads
        building them fight for the GIL."""
        d = os.path.join(self.files, k.loc, "c")
        _wrap_os(self.root, k.loc, lambda d=d: os.makedirs(d, exist_ok=True))
        for i in range(k.n_chunks):
            job = self.io.submit(self.put, os.path.join(d, str(i)), k.chunk(i))
            self.bar.after(job, k.nbytes // k.n_chunks)
            cost = 0 if k.chunks is not None else _plan.PACK_CHUNK
            self.queue(job, cost, k.loc, min(budget, PACK_FLIGHT))

    def finish(self) -> None:
        """Waits for every write; on an error, lets every write land before the caller
        removes the directory."""
        try:
            for done, _, owner in self.jobs:
                self.settle(owner, _wrap_os(self.root, owner, done.result))
        except BaseException:
            for done, _, _ in self.jobs:
                done.exception()
            raise


def _host_of(data: Any) -> Any:
    """What ``write_piece`` calls for a piece's host bytes (a ``Zeros`` marker as it is)."""
    if isinstance(data, _memory.Zeros):
        return lambda: data
    if isinstance(data, _incremental.Unchanged):  # read only if it cannot be linked after all
        return lambda: _to_host(data.data, False)
    if isinstance(data, Future):  # a device copy on its way to the host: it may be Zeros
        return data.result
    return functools.partial(_to_host, data, False)


def _zero_list(meta: dict[str, Any], coords: list[tuple[int, ...]]) -> str | list[int]:
    """A record's ``"zero_chunks"``: ``"all"``, or the sorted flat indices (C order)."""
    grid = _chunks.chunk_grid(meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"])
    flat = sorted({_chunks.flat_index(c, grid) for c in coords})
    return "all" if len(flat) == math.prod(grid) else flat


def written_keys(arrays: list[_plan.Array], packs: list[_plan.Pack], primary: bool) -> list[str]:
    """The files :func:`write_arrays` wrote for this process, relative to the checkpoint: the
    chunks its pieces cover but the all-zero ones left out, and (``primary``) each array's
    ``zarr.json``."""
    keys = []
    for a in arrays:
        if primary:
            keys.append(f"{a.loc}/zarr.json")
        shape, chunks = a.meta["shape"], a.meta["chunk_grid"]["configuration"]["chunk_shape"]
        if not a.pieces or math.prod(shape) == 0:
            continue
        grid = _chunks.chunk_grid(shape, chunks)
        absent = _chunks.zero_set(a.record.get("zero_chunks"), math.prod(grid))
        for p in a.pieces:
            for coords in _chunks.covered(shape, chunks, p.index):
                if not absent or _chunks.flat_index(coords, grid) not in absent:
                    keys.append(f"{a.loc}/{_chunks.chunk_key(coords)}")
    for k in packs:
        keys += [f"{k.loc}/zarr.json", *(f"{k.loc}/c/{i}" for i in range(k.n_chunks))]
    return keys


@phase("save: wrote the metadata")
def write_json_files(root: str, files: dict[str, Any]) -> None:
    """The metadata files (:meth:`jaxckpt.storage.base.Store.write_many`).

    Each value of ``files`` (a JSON value) is replaced by the bytes written for it, which
    ``COMMIT``'s checksums are then taken of without encoding the files again (a big tree's
    split records make a megabyte of JSON).
    """
    for k, obj in files.items():
        files[k] = obj if isinstance(obj, bytes) else _chunks.json_bytes(obj)
    store = _storage.at(root)
    _wrap_os(root, "", lambda: store.write_many(files))


@phase("save: made the files durable")
def durable(root: str) -> None:
    """Every byte this process wrote under ``root`` is durable (one ``syncfs`` on a local disk;
    an acknowledged PUT already is)."""
    _wrap_os(root, "", _storage.at(root).make_durable)


def _write_arrays_ts(root: str, arrays: list[_plan.Array], budget: int) -> None:
    """TensorStore writes every piece, keeping at most ``budget`` bytes in flight."""
    peer = not _multihost.is_primary()  # process 0 writes each array's zarr.json
    store = _storage.at(root)
    opened = [store.open_array(a.loc, a.meta, create=True, peer_creates=peer) for a in arrays]
    inflight: deque[tuple[Any, int, str]] = deque()
    held = 0
    bar = _progress.current()
    try:
        for a, fut in zip(arrays, opened, strict=True):
            array = _result(root, a.loc, fut)
            for p in a.pieces:
                host = _to_host(p.data, copy=False)
                if host.dtype.name != a.meta["data_type"]:
                    host = host.view(a.meta["data_type"])
                w = array[p.index].write(host, can_reference_source_data_indefinitely=True)
                inflight.append((w, p.nbytes, a.loc))
                held += p.nbytes
                while held > budget and inflight:
                    done, n, loc = inflight.popleft()
                    _result(root, loc, done)
                    bar.add(n)
                    held -= n
        for w, n, loc in inflight:
            _result(root, loc, w)
            bar.add(n)
    except BaseException:
        # Let every write still in flight land before the caller removes what was written.
        for f in [*opened, *(w for w, _, _ in inflight)]:
            f.exception()
        raise


def _wrap_os(root: str, owner: _plan.Array | str | None, fn: Any) -> Any:
    """Runs a local write; its ``OSError`` (a full disk, say) names the directory and array."""
    try:
        return fn()
    except OSError as e:
        loc = owner.loc if isinstance(owner, _plan.Array) else (owner or "")
        raise _storage.storage_error(root, e, loc) from e


def _result(root: str, loc: str, fut: Any) -> Any:
    """A write's result; its storage error (after TensorStore's retries) names URL and array."""
    try:
        return fut.result()
    except ValueError as e:
        raise _storage.storage_error(root, e, loc) from e
