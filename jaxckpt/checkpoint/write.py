"""Planning and writing a tree's arrays: pieces, packs of small leaves, chunk writes.

``plan`` walks the tree once into a structure record, the arrays (each with the pieces this
process writes) and the packs of small leaves; an async save snapshots them first
(:mod:`jaxckpt.checkpoint.snapshot`); ``write_arrays`` writes them, directly as zarr chunk files on a
local disk and through TensorStore elsewhere.

A single-process save to a local disk leaves all-zero chunks unwritten and lists them in the
leaf record (``"zero_chunks"``); an async snapshot keeps an all-zero piece as a
:class:`_memory.Zeros` marker instead of a copy.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import os
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import progress as _progress
from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import device as _device
from jaxckpt.checkpoint import incremental as _incremental
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import shares as _shares
from jaxckpt.format import checksum as _checksum
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format import split as _split
from jaxckpt.log import phase
from jaxckpt.storage import arrays as _arrays
from jaxckpt.storage import chunk_files as _chunks

PyTree = Any
# Host bytes a synchronous save holds in flight (device-to-host copies not yet on disk).
STREAM_BYTES = 512 << 20
# Array leaves under this size are packed together; 1 MiB or more has its own zarr array.
PACK_BELOW = 1 << 20
# Packing starts at this many small leaves: a small model keeps one zarr array per leaf (each
# readable by zarr-python at its own path), while 10,000 tiny arrays do not cost 10,000 files.
PACK_MIN_LEAVES = 64
PACK_CHUNK = 1 << 20  # chunk of a pack array: what reading one small leaf reads at most twice
PACK_MAX = 1 << 30  # a pack array holds at most this many bytes; more start another
PACK_ALIGN = 64  # leaf offsets in a pack: restored leaves are aligned views of the read chunks
PACK_FLIGHT = 32 << 20  # pack chunks a synchronous save builds ahead of the writes
PACK_DIR = "~pack"  # "~" starts no escaped edge name, so this never collides with the tree


@dataclasses.dataclass
class Piece:
    index: tuple[slice, ...]
    # np.ndarray, a single-device jax.Array not yet on the host, _memory.Zeros, or a Future of
    # one of those on its way from a device copy (fetch)
    data: Any
    nbytes: int


@dataclasses.dataclass
class Array:
    loc: str
    meta: dict[str, Any]
    pieces: list[Piece]
    record: dict[str, Any]  # the leaf record, where the writer lists its absent zero chunks
    source: weakref.ref[Any] | None = None  # the jax.Array leaf (incremental saves compare it)


@dataclasses.dataclass
class Pack:
    """Small leaves concatenated into one 1-D uint8 zarr array at ``loc``."""

    loc: str
    nbytes: int = 0
    starts: list[int] = dataclasses.field(default_factory=list)
    leaves: list[Any] = dataclasses.field(default_factory=list)  # arrays, in ``starts`` order
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the leaves'
    chunks: list[np.ndarray] | None = None  # the snapshot: every chunk's bytes
    # An async snapshot's bytes, whose views ``chunks`` are, until _snapshot.seal_packs ran
    whole: np.ndarray | None = None

    @property
    def meta(self) -> dict[str, Any]:
        return _arrays.array_metadata([self.nbytes], "uint8", [PACK_CHUNK])

    @property
    def n_chunks(self) -> int:
        return -(-self.nbytes // PACK_CHUNK)

    def chunk(self, k: int, taken: list[np.ndarray] | None = None) -> np.ndarray:
        """The bytes of chunk ``k`` (the last one padded with zeros to a full chunk); with
        ``taken`` (a snapshot), in a pooled buffer that is appended to it."""
        if self.chunks is not None:
            return self.chunks[k]
        lo, hi = k * PACK_CHUNK, min((k + 1) * PACK_CHUNK, self.nbytes)
        if taken is None:
            buf = np.zeros(PACK_CHUNK, np.uint8)  # alignment gaps and the tail are zeros
        else:
            buf = _runtime.take_buffer(PACK_CHUNK)
            buf.fill(0)
            taken.append(buf)
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < hi:
            off, raw = self.starts[i], _memory.as_bytes(np.ascontiguousarray(self.leaves[i]))
            a, b = max(lo, off), min(hi, off + raw.size)
            if b > a:
                buf[a - lo : b - lo] = raw[a - off : b - off]
            if off >= lo:  # the leaf starts here: its own checksum, for reading it alone
                self.records[i]["crc32c"] = _checksum.crc32c(raw)
            i += 1
        return buf


def _pieces(x: Any) -> tuple[list[Piece], tuple[int, ...] | None]:
    """The parts of ``x`` this process writes (one replica of each shard) and the shard shape.

    In a multi-process job a value local to each process (a NumPy array, or a ``jax.Array``
    on this process's devices only) is saved from process 0, like the tree's Python values.
    """
    from_peer = _multihost.process_count() > 1 and not _multihost.is_primary()
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        shard_shape = tuple(x.sharding.shard_shape(x.shape))
        if from_peer and x.is_fully_addressable:
            return [], shard_shape
        pieces = [
            Piece(tuple(s.index), s.data, s.data.nbytes)
            for s in x.addressable_shards
            if s.replica_id == 0
        ]
        return pieces, shard_shape
    arr = np.asarray(x)
    if from_peer:
        return [], None
    return [Piece(tuple(slice(None) for _ in arr.shape), arr, arr.nbytes)], None


def _packable(x: Any, nbytes: int) -> bool:
    """A small array leaf (of ``nbytes``) on one device (a sharded one keeps chunks that follow
    its shards)."""
    if nbytes >= PACK_BELOW or isinstance(x, jax.core.Tracer):
        return False  # a tracer is refused with its key path by _metadata.check_array
    if isinstance(x, jax.Array):
        s = x.sharding  # device_set builds a set: costly for 10,000 leaves
        return isinstance(s, jax.sharding.SingleDeviceSharding) or len(s.device_set) == 1
    return isinstance(x, (np.ndarray, np.generic))


def _nbytes(x: Any) -> int:
    """An array's bytes (0 for a value), cheaper than ``jax.Array.nbytes``."""
    dtype = getattr(x, "dtype", None)
    return math.prod(x.shape) * dtype.itemsize if dtype is not None and hasattr(x, "shape") else 0


class Plan(NamedTuple):
    """What a save writes: the structure record, the arrays with their own zarr paths, and the
    packs of small leaves."""

    record: dict[str, Any]
    arrays: list[Array]
    packs: list[Pack]


def plan(tree: PyTree) -> Plan:
    arrays: list[Array] = []
    packs: list[Pack] = []
    # Packing needs every byte of a leaf on this process; multi-process saves keep one path each.
    pack = _multihost.process_count() == 1 and (
        sum(_packable(x, _nbytes(x)) for x in jax.tree_util.tree_leaves(tree)) >= PACK_MIN_LEAVES
    )
    shares = _shares.Shares.start()  # several processes: replicas share the writing

    def array_record(path: str, x: Any) -> dict[str, Any]:  # x passed _metadata.check_array
        dtype = np.dtype(x.dtype)
        shape = tuple(int(d) for d in np.shape(x))
        nbytes = math.prod(shape) * dtype.itemsize
        name = _metadata.dtype_name(dtype)
        rec: dict[str, Any] = {"t": "array", "dtype": name, "shape": list(shape)}
        if isinstance(x, np.generic):
            rec["np_scalar"] = True
        if pack and _packable(x, nbytes):
            if not packs or packs[-1].nbytes + nbytes > PACK_MAX:
                packs.append(Pack(f"{PACK_DIR}/{len(packs)}"))
            p = packs[-1]
            start = -(-p.nbytes // PACK_ALIGN) * PACK_ALIGN
            rec["loc"], rec["packed"] = p.loc, [start, nbytes, PACK_CHUNK]
            if nbytes:
                p.starts.append(start)
                p.leaves.append(x)
                p.records.append(rec)
                p.nbytes = start + nbytes
            return rec
        pieces, shard = _pieces(x)
        data_type = _arrays.stored_dtype(dtype)
        chunks = _arrays.chunk_shape(shape, dtype.itemsize, shard)
        if shares is not None and shares.spans(x):
            chunks = shares.chunk_shape(x, dtype.itemsize)
        loc = path or "%"
        meta = _arrays.array_metadata(shape, data_type, chunks)
        arrays.append(Array(loc, meta, pieces, rec, source_of(x)))
        if shares is not None:
            shares.add(arrays[-1], x, nbytes)
        rec["chunks"], rec["loc"] = chunks, loc
        if data_type != name:
            rec["stored"] = data_type
        return rec

    record, _ = _metadata.describe(tree, array_record)
    if shares is not None:
        shares.deal()
    return Plan(record, arrays, packs)


def source_of(x: Any) -> weakref.ref[Any] | None:
    """A weak reference to a ``jax.Array`` leaf: the same object at the next save is unchanged
    (a NumPy array is not: it may have been written to since)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return weakref.ref(x)
    return None


def group_files(node: dict[str, Any], moved: dict[str, Any], prefix: str = "") -> dict[str, Any]:
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
    arrays: list[Array],
    packs: list[Pack],
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
    io = _runtime.pool("write")
    bar = _progress.current()
    jobs: deque[tuple[Any, int, Array | str | None]] = deque()
    if _multihost.is_primary():  # process 0 writes each array's zarr.json
        for loc, meta in [(a.loc, a.meta) for a in arrays] + [(k.loc, k.meta) for k in packs]:
            path = os.path.join(files, loc, "zarr.json")
            jobs.append((io.submit(_chunks.write_json, path, meta), 0, None))
    held = 0
    fallback: dict[int, Array] = {}
    skip_zeros = _multihost.process_count() == 1
    zeros: dict[int, list[tuple[int, ...]]] = {}
    put = linker.put if linker is not None else _chunks.write_chunk

    def settle(owner: Array | str | None, result: Any) -> None:
        if not isinstance(owner, Array):
            return
        if result is None:
            fallback[id(owner)] = owner
        elif result:
            zeros.setdefault(id(owner), []).extend(result)

    def queue(job: Future[Any], cost: int, owner: Array | str, bound: int) -> None:
        """Adds a write costing ``cost`` bytes in flight; waits for the oldest past ``bound``."""
        nonlocal held
        jobs.append((job, cost, owner))
        held += cost
        while held > bound and jobs:
            done, n, first = jobs.popleft()
            settle(first, _wrap_os(root, first, done.result))
            held -= n

    for a in arrays:
        m = a.meta
        for p in a.pieces:
            if math.prod(m["shape"]) == 0:
                continue
            write = functools.partial(
                _chunks.write_piece,
                files,
                a.loc,
                m["data_type"],
                m["chunk_grid"]["configuration"]["chunk_shape"],
                m["shape"],
                p.index,
                _host_of(p.data),
                skip_zeros,
                put,
            )
            # Decided before the job runs: a piece it cannot link becomes its array again.
            cost = 0 if isinstance(p.data, (np.ndarray, _memory.Zeros)) else p.nbytes
            if isinstance(p.data, _incremental.Unchanged):  # linked, else written from the array
                cost = 0
                job = io.submit(linker.piece, a.loc, m, p, write)  # type: ignore[union-attr]
            else:
                job = io.submit(write)
            bar.after(job, p.nbytes)
            queue(job, cost, a, budget)
    for k in packs:  # chunks built here, on one thread: I/O threads building them fight for the GIL
        d = os.path.join(files, k.loc, "c")
        _wrap_os(root, k.loc, lambda d=d: os.makedirs(d, exist_ok=True))
        for i in range(k.n_chunks):
            job = io.submit(put, os.path.join(d, str(i)), k.chunk(i))
            bar.after(job, k.nbytes // k.n_chunks)
            cost = 0 if k.chunks is not None else PACK_CHUNK
            queue(job, cost, k.loc, min(budget, PACK_FLIGHT))
    try:
        for done, _, owner in jobs:
            settle(owner, _wrap_os(root, owner, done.result))
    except BaseException:
        for done, _, _ in jobs:  # let every write land before the caller removes the directory
            done.exception()
        raise
    if fallback:  # TensorStore writes every chunk of these, zeros included
        _write_arrays_ts(root, list(fallback.values()), budget)
    for a in arrays:
        if id(a) in zeros and id(a) not in fallback:
            a.record["zero_chunks"] = _zero_list(a.meta, zeros[id(a)])


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


def written_keys(arrays: list[Array], packs: list[Pack], primary: bool) -> list[str]:
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


def _write_arrays_ts(root: str, arrays: list[Array], budget: int) -> None:
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


def _wrap_os(root: str, owner: Array | str | None, fn: Any) -> Any:
    """Runs a local write; its ``OSError`` (a full disk, say) names the directory and array."""
    try:
        return fn()
    except OSError as e:
        loc = owner.loc if isinstance(owner, Array) else (owner or "")
        raise _storage.storage_error(root, e, loc) from e


def _result(root: str, loc: str, fut: Any) -> Any:
    """A write's result; its storage error (after TensorStore's retries) names URL and array."""
    try:
        return fut.result()
    except ValueError as e:
        raise _storage.storage_error(root, e, loc) from e
