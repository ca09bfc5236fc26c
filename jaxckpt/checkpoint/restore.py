"""Restoring into a target tree: the saved arrays read, cast and placed as the target asks."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
from typing import Any

import jax
import numpy as np

from jaxckpt import progress as _progress
from jaxckpt.checkpoint import broadcast as _broadcast
from jaxckpt.checkpoint import device as _device
from jaxckpt.checkpoint import match as _match
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint.reader import Reader, open_reader
from jaxckpt.errors import StructureMismatchError
from jaxckpt.format import metadata as _metadata
from jaxckpt.format.metadata import Record
from jaxckpt.log import logged_restore

PyTree = Any
log = logging.getLogger("jaxckpt")


@logged_restore
@_metadata.gc_paused()  # a restore of 10,000 leaves would trigger collections (JAX's gc callback)
def restore(
    path: str | os.PathLike[str],
    target: PyTree = None,
    *,
    partial: bool = False,
    missing: str = "error",
    mismatched: str = "error",
    prefix: _match.Prefix = None,
    rename: _match.Rename = None,
) -> PyTree:
    """Restores the checkpoint at ``path``, into ``target``'s structure, dtypes and shardings.

    Args:
        path: a checkpoint directory, or an Orbax, Flax msgpack or safetensors checkpoint
            (see docs/interop.md).
        target: the tree to restore into. Its leaves may be ``jax.Array``, ``np.ndarray``,
            ``jax.ShapeDtypeStruct`` (with or without a sharding), Python scalars, str/bytes,
            or objects with ``get_state``/``set_state`` (``set_state`` is called). An
            ``nnx.Module`` is restored in place (its ``nnx.state``, then ``nnx.update``) and
            returned. None: rebuild the saved tree as dicts, lists and tuples of NumPy arrays
            (an NNX state as the pure dict ``nnx.update`` takes).
        partial: skip saved leaves the target does not ask for (they are never read).
        missing: ``"keep"`` keeps the target's own value for leaves the checkpoint lacks.
        mismatched: ``"keep"`` keeps the target's own value for leaves whose saved shape or
            dtype the target cannot take (a new head with another number of classes); they
            are not read.
        prefix: the checkpoint subtree (``"params/backbone"``, or the keys
            ``("params", "backbone")``) restored as the target's root.
        rename: maps target paths to checkpoint paths: a dict of regex -> replacement
            (applied in order) or a callable returning the checkpoint path or None.

    Returns:
        The restored tree.

    Raises:
        CheckpointNotFoundError: no committed checkpoint at ``path``.
        StructureMismatchError: leaves missing, unused or of a shape/dtype the target cannot
            take; the message lists them with their key paths.
        CorruptCheckpointError: a chunk or a metadata file fails its checksum (named).

    Example:
        >>> state = jc.restore("/tmp/run/ckpt-10", target=state)  # doctest: +SKIP
    """
    for name, value in (("missing", missing), ("mismatched", mismatched)):
        if value not in ("error", "keep"):
            raise ValueError(f'{name} must be "error" or "keep", not {value!r}')
    module = _nnx_module(target)
    if module is not None:  # NNX's convention: the module is updated in place
        from flax import nnx

        state = restore(
            path, nnx.state(module), partial=partial, missing=missing,
            mismatched=mismatched, prefix=prefix, rename=rename,
        )  # fmt: skip
        nnx.update(module, state)
        return module
    if target is None:
        return _restore_saved_tree(path, prefix)
    want = _match.Target.of(target, prefix, rename)
    # A partial restore looks up few paths: their group files are read beside the root's.
    reader = open_reader(path, prefetch=want.groups() if partial else ())
    if not partial and prefix is None and isinstance(reader, Reader):
        # Every leaf is read: the disk reads the packs while the records are checked and
        # matched. The records' files first, which would otherwise queue behind the packs.
        reader.structure  # noqa: B018
        reader.prefetch_packs()
    found = _match.plan(reader, want, prefix, unused=not partial)
    entries = _settled(reader, found, partial=partial, missing=missing, mismatched=mismatched)
    reads = _planned_reads(reader, entries)
    arrays = _read(reader, reads)
    leaves = _assembled(entries, reads, arrays)
    return jax.tree_util.tree_unflatten(found.treedef, leaves)


def _restore_saved_tree(path: str | os.PathLike[str], prefix: _match.Prefix) -> PyTree:
    """The saved tree (under ``prefix``) as dicts, lists and tuples of NumPy arrays."""
    reader = open_reader(path)
    base = _match.check_prefix(reader, prefix)
    under = lambda: [(p, None) for p in reader.leaves(base)]  # noqa: E731
    with _progress.shown(f"restore {reader.path}", lambda: _read_bytes(reader, under())):
        return reader.tree(base)


def _settled(
    reader: Reader, found: _match.Plan, *, partial: bool, missing: str, mismatched: str
) -> list[_match.Pairing]:
    """The pairings a restore reads, once the options said what to do with the leaves that
    are missing, unused or mismatched: kept (with a warning) or a ``StructureMismatchError``."""
    entries, status = found.pairings, found.status
    if status.mismatched and mismatched == "keep":
        kept = {m.path for m in status.mismatched}
        entries = [e._replace(record=None) if e.cpath in kept else e for e in entries]
        log.warning(
            "jaxckpt: kept the target's own value for %d leaves whose saved shape or dtype it "
            "cannot take, in %s: %s",
            len(kept),
            reader.path,
            ", ".join(str(m) for m in status.mismatched),
        )
        status.mismatched = []
    if (
        status.mismatched
        or (status.missing and missing == "error")
        or (status.unused and not partial)
    ):
        raise StructureMismatchError(status.message(missing=missing == "error", unused=not partial))
    if status.missing:
        log.warning(
            "jaxckpt: kept the target's own value for %d leaves the checkpoint at %s lacks: %s",
            len(status.missing),
            reader.path,
            ", ".join(status.missing),
        )
    return entries


@dataclasses.dataclass
class _Reads:
    """What a restore reads: one request per distinct slice any addressable device needs."""

    requests: list[tuple[str, Any]]  # (checkpoint path, index or None)
    # Per pairing: None (nothing read), the request of a whole array for one device, or
    # ({device: index}, {index key: request}).
    plans: list[Any]
    to_device: dict[int, tuple[np.dtype, Any]]  # whole arrays for one device each
    everywhere: list[int]  # whole arrays every process restores: read once, broadcast


def _planned_reads(reader: Reader, entries: list[_match.Pairing]) -> _Reads:
    reads = _Reads([], [], {}, [])
    requests, to_device, plans = reads.requests, reads.to_device, reads.plans
    broadcast = _broadcast.wanted(reader.path)
    for _, x, cpath, rec in entries:
        if rec is None or cpath is None or rec["t"] != "array":  # (a record has a path)
            plans.append(None)
            continue
        sharding = _sharding(x)
        if sharding is not None and "key" not in rec and _one_device(sharding):
            # The common case, first: a whole array for one device.
            i = len(requests)
            if broadcast and _broadcast.everywhere(rec, sharding):
                reads.everywhere.append(i)
            to_device[i] = (np.dtype(x.dtype), sharding)
            plans.append(i)
            requests.append((cpath, None))
            continue
        shards = {None: None} if "key" in rec else _target_shards(x, tuple(rec["shape"]))
        slots = {}
        for idx in shards.values():
            key = _index_key(idx)
            if key not in slots:
                slots[key] = len(requests)
                requests.append((cpath, idx))
        plans.append((shards, slots))
        if broadcast and len(slots) == 1 and _broadcast.everywhere(rec, sharding):
            reads.everywhere.append(next(iter(slots.values())))
    return reads


def _read(reader: Reader, reads: _Reads) -> list[Any]:
    """Every request read, all issued together; whole arrays for one device put there on
    the I/O thread that read them."""
    to_device = reads.to_device

    def put(i: int, host: np.ndarray) -> Any:  # on the I/O thread that read it
        bar.add(host.nbytes)  # other reads (slices, packed leaves) count when all have landed
        if i not in to_device:
            return host
        dtype, sharding = to_device[i]
        return _device.put_many([host.astype(dtype, copy=False)], [sharding])[0]

    with _progress.shown(
        f"restore {reader.path}", lambda: _read_bytes(reader, reads.requests)
    ) as bar:
        return _broadcast.read_many(reader, reads.requests, reads.everywhere, then=put)


def _assembled(entries: list[_match.Pairing], reads: _Reads, arrays: list[Any]) -> list[Any]:
    """The restored leaves, in flatten order: arrays read placed as the target asks, saved
    values and states loaded (``set_state`` called), the target's own value where kept."""
    leaves: list[Any] = []
    states = []
    batch: list[tuple[int, np.ndarray, Any]] = []
    to_device = reads.to_device
    for (_, x, _, rec), plan in zip(entries, reads.plans, strict=True):
        if type(plan) is int:  # a whole array for one device: read via ``put``
            got = arrays[plan]
            if isinstance(got, np.ndarray):
                # Not put as it was read (a packed leaf, say): one device_put for all such
                # leaves, as per-call overhead dominates.
                dtype, sharding = to_device[plan]
                batch.append((len(leaves), got.astype(dtype, copy=False), sharding))
                got = None
            leaves.append(got)
        elif plan is not None:
            shards, slots = plan
            pieces = {d: arrays[slots[_index_key(i)]] for d, i in shards.items()}
            assert rec is not None  # a plan is made only for a record
            leaves.append(_assemble(x, rec, pieces))
        elif rec is None:
            leaves.append(x)
        elif rec["t"] == "state":
            states.append((x, _metadata.load_state(_multihost.own_state(rec))))
            leaves.append(x)
        else:  # a saved Python value
            v = _metadata.load_value(rec)
            leaves.append(
                _as_target(x, np.asarray(v)) if _match.leaf_kind(x) in ("array", "scalar") else v
            )
    if batch:
        placed = _device.put_many([b[1] for b in batch], [b[2] for b in batch])
        for (i, _, _), y in zip(batch, placed, strict=True):
            leaves[i] = y
    for obj, state in states:
        obj.set_state(state)
    return leaves


def _nnx_module(target: Any) -> Any:
    """``target`` if it is an ``nnx.Module`` (flax imported only when the caller has)."""
    nnx = sys.modules.get("flax.nnx")
    return target if nnx is not None and isinstance(target, nnx.Module) else None


def _read_bytes(reader: Reader, requests: list[tuple[str, Any]]) -> int:
    """Bytes the reads of a restore bring in: whole arrays, or the slices asked for."""
    total = 0
    for path, idx in requests:
        rec = reader.record(path)
        if rec["t"] != "array":
            continue
        shape = rec["shape"]
        if idx is not None:
            shape = [len(range(*s.indices(n))) for s, n in zip(idx, shape, strict=False)]
            shape += rec["shape"][len(idx) :]
        total += math.prod(shape) * np.dtype(rec["dtype"]).itemsize
    return total


def _sharding(x: Any) -> jax.sharding.Sharding | None:
    if type(x) is not jax.ShapeDtypeStruct and isinstance(x, jax.Array):  # a slow isinstance
        return x.sharding
    if isinstance(x, jax.ShapeDtypeStruct):
        s = getattr(x, "sharding", None)
        return s if s is not None else _default_sharding()
    return None


@functools.cache
def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _target_shards(x: Any, shape: tuple[int, ...]) -> dict[Any, Any]:
    """``{device: index}`` of the slices the target's addressable devices need (None: all)."""
    sharding = _sharding(x)
    if sharding is None:
        return {None: None}
    return dict(sharding.addressable_devices_indices_map(shape))


def _one_device(sharding: jax.sharding.Sharding) -> bool:
    """Whether ``sharding`` places an array whole on one device (any kind of sharding:
    a ``NamedSharding`` over a mesh of one device does too) of this process."""
    if type(sharding) is jax.sharding.SingleDeviceSharding:  # the common case, first
        return True
    return sharding.num_devices == 1 and sharding.is_fully_addressable


def _index_key(idx: Any) -> Any:
    if idx is None:
        return None
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)


def _as_target(x: Any, arr: np.ndarray) -> Any:
    kind = _match.leaf_kind(x)
    if kind == "scalar":
        return type(x)(arr.item())
    if kind != "array":
        return arr
    out = arr.astype(np.dtype(x.dtype), copy=False)
    if isinstance(x, np.generic):
        return out[()]
    if isinstance(x, np.ndarray):
        return out
    return jax.device_put(out, _sharding(x))


def _assemble(x: Any, rec: Record, pieces: dict[Any, np.ndarray]) -> Any:
    sharding = _sharding(x)
    if "key" in rec:  # small: read whole, wrapped, then placed
        keys = _metadata.load_key(rec, pieces[None])
        return keys if sharding is None else jax.device_put(keys, sharding)
    if sharding is None:
        return _as_target(x, pieces[None])
    dtype = np.dtype(x.dtype)
    bufs = [jax.device_put(p.astype(dtype, copy=False), d) for d, p in pieces.items()]
    return jax.make_array_from_single_device_arrays(tuple(rec["shape"]), sharding, bufs)
