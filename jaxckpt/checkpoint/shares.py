"""Who writes what in a multi-process save: every replica writes a share.

A shard held by several processes (a replicated array under pure data parallelism) used to be
written whole by the process holding its replica 0, so process 0 wrote the whole replicated
state while the others waited. Here its chunks are dealt out among the processes holding it:
each chunk is still written exactly once, by one of them, and each process writes about 1/P.

The assignment is computed by every process alike, from what every process knows the same way
(the tree's structure, each leaf's global sharding and shape), in the tree's order: no
communication. It deals units (chunks, or whole packs) largest first, each to the least loaded
of the processes that hold it (a greedy longest-processing-time schedule); data held by one
process only (sharded data, and process 0's local values) counts towards that process's load
first. The same dealing serves a restore that reads replicated data once and broadcasts it
(:mod:`jaxckpt.checkpoint.broadcast`).

``JAXCKPT_SHARE_REPLICAS=0`` switches sharing off: the process holding replica 0 of each shard
writes it whole, as before (for comparison; both write the same checkpoint format).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxckpt.checkpoint import device as _device
from jaxckpt.storage import arrays as _arrays
from jaxckpt.storage import chunk_files as _chunks

ENV = "JAXCKPT_SHARE_REPLICAS"
# A shard held by h processes is cut into chunks of at most CHUNK_BYTES / h (but not below
# this), so that one large replicated array is itself written by all of its holders.
MIN_CHUNK = 4 << 20


def enabled() -> bool:
    """Whether replicas share the writing (``$JAXCKPT_SHARE_REPLICAS``, on unless ``0``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Part:
    """A chunk of a shard's data, cut out only when written: a view on the host, a slice on
    an accelerator (only the part crosses the bus)."""

    __slots__ = ("data", "local")

    def __init__(self, data: Any, local: tuple[slice, ...]):
        self.data = data
        self.local = local

    def host(self) -> np.ndarray:
        d = self.data
        if isinstance(d, jax.Array) and next(iter(d.devices())).platform != "cpu":
            return _device.to_host(d[self.local])
        return np.asarray(d)[self.local]


def deal(sizes: Sequence[int], holders: Sequence[Sequence[int]], load: list[int]) -> list[int]:
    """The process that takes each unit: largest first, to the least loaded of its holders
    (ties to the lowest index). ``load`` (bytes per process, updated) is what each already has."""
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(holders[i], key=lambda p: (load[p], p))
        load[owner[i]] += sizes[i]
    return owner


def _key(index: Sequence[slice]) -> tuple[tuple[int, int], ...]:
    return tuple((s.start or 0, s.stop if s.stop is not None else -1) for s in index)


@dataclasses.dataclass
class _Unit:
    array: Any  # _plan.Array
    index: tuple[slice, ...]  # the chunk, in the array
    shard: Any  # this process's copy of the shard (None when it holds none)
    local: tuple[slice, ...]  # the chunk, in the shard
    nbytes: int
    holders: tuple[int, ...]
    whole: bool  # the whole shard


class Shares:
    """One save's plan of shares: ``add`` each array leaf as the walk meets it, then ``deal``."""

    def __init__(self) -> None:
        self.me = jax.process_index()
        self.load = [0] * jax.process_count()
        self.units: list[_Unit] = []

    @staticmethod
    def start() -> Shares | None:
        """A plan for this save; None on one process or with sharing switched off."""
        return Shares() if jax.process_count() > 1 and enabled() else None

    @staticmethod
    def spans(x: Any) -> bool:
        """Whether ``x`` is a global array (on devices of several processes)."""
        return (
            isinstance(x, jax.Array)
            and not isinstance(x, jax.core.Tracer)
            and not x.is_fully_addressable
        )

    def chunk_shape(self, x: Any, itemsize: int) -> list[int]:
        """The chunks of the global array ``x``: finer where several processes hold a shard."""
        shape = tuple(x.shape)
        shard = tuple(x.sharding.shard_shape(shape))
        chunks = _arrays.chunk_shape(shape, itemsize, shard)
        holders = max(len(who) for who in _holders(x)[0].values())
        most = max(MIN_CHUNK, _arrays.CHUNK_BYTES // holders)
        for axis in range(len(chunks)):  # halve while it divides, as _storage does
            while math.prod(chunks) * itemsize > most and chunks[axis] % 2 == 0:
                chunks[axis] //= 2
        return chunks

    def add(self, array: Any, x: Any, nbytes: int) -> None:
        """``array`` (a planned ``_plan.Array`` of the leaf ``x``, ``nbytes``) is written by
        its shares: its pieces are set by :meth:`deal`. A process-local value is process 0's."""
        if not self.spans(x):
            self.load[0] += nbytes
            return
        array.pieces = []
        shape = tuple(x.shape)
        if math.prod(shape) == 0:
            return
        chunks = array.meta["chunk_grid"]["configuration"]["chunk_shape"]
        itemsize = np.dtype(x.dtype).itemsize
        holders, indices = _holders(x)
        mine: dict[Any, Any] = {}
        for s in x.addressable_shards:  # the lowest replica this process holds of each shard
            k = _key(s.index)
            if k not in mine or s.replica_id < mine[k].replica_id:
                mine[k] = s
        for k, who in holders.items():
            index = indices[k]
            held = mine.get(k)
            data = None if held is None else held.data
            plan = _chunks.piece_chunks(shape, chunks, index)
            if len(who) == 1 or plan is None or len(plan) == 1:  # the whole shard, one unit
                parts = [(index, tuple(slice(None) for _ in shape))]
            else:
                starts = [s.indices(n)[0] for s, n in zip(index, shape, strict=True)]
                parts = [
                    (
                        tuple(
                            slice(a + s.start, a + s.stop)
                            for a, s in zip(starts, local, strict=True)
                        ),
                        local,
                    )
                    for _, local, _ in plan
                ]
            for glob, local in parts:
                size = math.prod(
                    len(range(*g.indices(n))) for g, n in zip(glob, shape, strict=True)
                )
                unit = _Unit(array, glob, data, local, size * itemsize, who, len(parts) == 1)
                if len(who) == 1:  # sharded: its holder's, counted before the dealing
                    self.load[who[0]] += unit.nbytes
                    if who[0] == self.me:
                        self._take(unit)
                else:
                    self.units.append(unit)

    def deal(self) -> None:
        """Deals the units held by several processes; this process keeps its own."""
        owner = deal([u.nbytes for u in self.units], [u.holders for u in self.units], self.load)
        for u, p in zip(self.units, owner, strict=True):
            if p == self.me:
                self._take(u)

    def _take(self, u: _Unit) -> None:
        from jaxckpt.checkpoint.plan import Piece  # _plan imports this module

        data = u.shard if u.whole else Part(u.shard, u.local)
        u.array.pieces.append(Piece(u.index, data, u.nbytes))


def _holders(x: Any) -> tuple[dict[Any, tuple[int, ...]], dict[Any, tuple[slice, ...]]]:
    """``({shard: processes holding it}, {shard: its index})`` of a global array, each shard
    keyed by its index; in the order of the sharding's devices (the same in every process)."""
    holders: dict[Any, set[int]] = {}
    indices: dict[Any, tuple[slice, ...]] = {}
    for d, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
        k = _key(index)
        holders.setdefault(k, set()).add(d.process_index)
        indices[k] = tuple(index)
    return {k: tuple(sorted(v)) for k, v in holders.items()}, indices
