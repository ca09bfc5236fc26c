"""Restoring into a target tree: the saved arrays read, cast and placed as the target asks."""

from __future__ import annotations

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
        reader = open_reader(path)
        base = _match.check_prefix(reader, prefix)
        under = lambda: [(p, None) for p in reader.leaves(base)]  # noqa: E731
        with _progress.shown(f"restore {reader.path}", lambda: _read_bytes(reader, under())):
            return reader.tree(base)
    want = _match.Target.of(target, prefix, rename)
    # A partial restore looks up few paths: their group files are read beside the root's.
    reader = open_reader(path, prefetch=want.groups() if partial else ())
    entries, treedef, status = _match.plan(reader, want, prefix, unused=not partial)
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

    # One read per distinct slice any addressable device needs, all issued together.
    requests: list[tuple[str, Any]] = []
    plans: list[Any] = []
    to_device: dict[int, tuple[np.dtype, Any]] = {}  # whole arrays for one device each
    everywhere: list[int] = []  # whole arrays every process restores: read once, broadcast
    broadcast = _broadcast.wanted(reader.path)
    for _, x, cpath, rec in entries:
        if rec is None or cpath is None or rec["t"] != "array":  # (a record has a path)
            plans.append(None)
            continue
        shards = {None: None} if "key" in rec else _target_shards(x, tuple(rec["shape"]))
        slots = {}
        for idx in shards.values():
            key = _index_key(idx)
            if key not in slots:
                slots[key] = len(requests)
                requests.append((cpath, idx))
        plans.append((shards, slots))
        sharding = _sharding(x)
        if broadcast and len(slots) == 1 and _broadcast.everywhere(rec, sharding):
            everywhere.append(next(iter(slots.values())))
        if sharding is not None and _one_device(sharding) is not None and "key" not in rec:
            to_device[slots[None]] = (np.dtype(x.dtype), sharding)

    def put(i: int, host: np.ndarray) -> Any:  # on the I/O thread that read it
        bar.add(host.nbytes)  # other reads (slices, packed leaves) count when all have landed
        if i not in to_device:
            return host
        dtype, sharding = to_device[i]
        return _device.put_many([host.astype(dtype, copy=False)], [sharding])[0]

    with _progress.shown(f"restore {reader.path}", lambda: _read_bytes(reader, requests)) as bar:
        arrays = _broadcast.read_many(reader, requests, everywhere, then=put)

    leaves: list[Any] = []
    states = []
    batch: list[tuple[int, np.ndarray, Any]] = []
    for (_, x, _, rec), plan in zip(entries, plans, strict=True):
        if rec is None:
            leaves.append(x)
        elif rec["t"] == "state":
            states.append((x, _metadata.load_state(_multihost.own_state(rec))))
            leaves.append(x)
        elif rec["t"] == "value":
            v = _metadata.load_value(rec)
            leaves.append(
                _as_target(x, np.asarray(v)) if _match.leaf_kind(x) in ("array", "scalar") else v
            )
        else:
            shards, slots = plan
            whole = slots.get(None)  # a whole array for one device: read via ``put``
            if whole in to_device:
                got = arrays[whole]
                if isinstance(got, np.ndarray):
                    # Not put as it was read (a packed leaf, say): one device_put for all such
                    # leaves, as per-call overhead dominates.
                    dtype, sharding = to_device[whole]
                    batch.append((len(leaves), got.astype(dtype, copy=False), sharding))
                    got = None
                leaves.append(got)
            else:
                pieces = {d: arrays[slots[_index_key(i)]] for d, i in shards.items()}
                leaves.append(_assemble(x, rec, pieces))
    if batch:
        placed = _device.put_many([b[1] for b in batch], [b[2] for b in batch])
        for (i, _, _), y in zip(batch, placed, strict=True):
            leaves[i] = y
    for obj, state in states:
        obj.set_state(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


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
    device = _one_device(sharding)
    if device is not None and isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return {device: None}  # the whole array, on one device
    return dict(sharding.addressable_devices_indices_map(shape))


_devices: dict[int, tuple[Any, Any]] = {}  # id(sharding) -> (sharding, its one device or None)


def _one_device(sharding: jax.sharding.Sharding) -> Any:
    """The device of a sharding on one device, else None; found once per sharding object
    (``device_set`` builds a set each time: a restore of 10,000 leaves asked 20,000 times)."""
    got = _devices.get(id(sharding))
    if got is not None and got[0] is sharding:
        return got[1]
    ds = sharding.device_set
    device = next(iter(ds)) if len(ds) == 1 else None
    if len(_devices) > 256:  # shardings of earlier restores (their ids may be reused)
        _devices.clear()
    _devices[id(sharding)] = (sharding, device)
    return device


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


def _assemble(x: Any, rec: dict[str, Any], pieces: dict[Any, np.ndarray]) -> Any:
    sharding = _sharding(x)
    if "key" in rec:  # small: read whole, wrapped, then placed
        keys = _metadata.load_key(rec, pieces[None])
        return keys if sharding is None else jax.device_put(keys, sharding)
    if sharding is None:
        return _as_target(x, pieces[None])
    dtype = np.dtype(x.dtype)
    bufs = [jax.device_put(p.astype(dtype, copy=False), d) for d, p in pieces.items()]
    return jax.make_array_from_single_device_arrays(tuple(rec["shape"]), sharding, bufs)
