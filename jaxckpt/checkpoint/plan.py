"""What a save writes: ``plan`` walks a tree once into its structure record, the arrays (each
with the pieces this process writes) and the packs of small leaves.

An async save snapshots the plan first (:mod:`jaxckpt.checkpoint.snapshot`);
:mod:`jaxckpt.checkpoint.write` writes it. A tree saved before is planned from a kept template
(:mod:`jaxckpt.checkpoint.plan_cache`) instead of walked again.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import weakref
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import runtime as _runtime
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import shares as _shares
from jaxckpt.format import checksum as _checksum
from jaxckpt.format import metadata as _metadata
from jaxckpt.format.metadata import Record
from jaxckpt.storage import arrays as _arrays

PyTree = Any

# Array leaves under this size are packed together; 1 MiB or more has its own zarr array.
PACK_BELOW = 1 << 20
# Packing starts at this many small leaves: a small model keeps one zarr array per leaf (each
# readable by zarr-python at its own path), while 10,000 tiny arrays do not cost 10,000 files.
PACK_MIN_LEAVES = 64
PACK_CHUNK = 1 << 20  # chunk of a pack array: what reading one small leaf reads at most twice
PACK_MAX = 1 << 30  # a pack array holds at most this many bytes; more start another
PACK_ALIGN = 64  # leaf offsets in a pack: restored leaves are aligned views of the read chunks
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
    record: Record  # the leaf record, where the writer lists its absent zero chunks
    source: weakref.ref[Any] | None = None  # the jax.Array leaf (incremental saves compare it)


@dataclasses.dataclass
class Pack:
    """Small leaves concatenated into one 1-D uint8 zarr array at ``loc``."""

    loc: str
    nbytes: int = 0
    starts: list[int] = dataclasses.field(default_factory=list)
    leaves: list[Any] = dataclasses.field(default_factory=list)  # arrays, in ``starts`` order
    records: list[Record] = dataclasses.field(default_factory=list)  # the leaves'
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
            buf = np.empty(PACK_CHUNK, np.uint8)
        else:
            buf = _runtime.take_buffer(PACK_CHUNK)
            taken.append(buf)
        filled = lo  # the chunk's bytes before this are written; alignment gaps are zeros
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < hi:
            off, raw = self.starts[i], _memory.as_bytes(np.ascontiguousarray(self.leaves[i]))
            a, b = max(lo, off), min(hi, off + raw.size)
            if b > a:
                buf[filled - lo : a - lo] = 0
                buf[a - lo : b - lo] = raw[a - off : b - off]
                filled = b
            if off >= lo:  # the leaf starts here: its own checksum, for reading it alone
                self.records[i]["crc32c"] = _checksum.crc32c(raw)
            i += 1
        buf[filled - lo :] = 0  # the tail, and the last chunk's padding
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

    record: Record
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

    def array_record(path: str, x: Any) -> Record:  # x passed _metadata.check_array
        dtype = np.dtype(x.dtype)
        shape = tuple(int(d) for d in np.shape(x))
        nbytes = math.prod(shape) * dtype.itemsize
        name = _metadata.dtype_name(dtype)
        rec: Record = {"t": "array", "dtype": name, "shape": list(shape)}
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
