"""Moving arrays between host and devices: many onto single devices at once, with as little
per-array Python as possible, and device arrays to the host at the bus's speed.

``jax.device_put`` spends much Python per array, which restoring 10,000 small leaves pays
10,000 times. XLA's own ``batched_device_put`` makes the same ``jax.Array`` (adopting a 64-byte
aligned host buffer without a copy on CPU) for a fraction of it (docs/speed.md). It is a
private API, so any surprise
falls back to ``jax.device_put``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

# The abstract values of the shapes and dtypes put before (immutable): a restore into a tree
# restored before makes none of them again.
_avals: dict[tuple[tuple[int, ...], np.dtype], Any] = {}
_AVALS_KEPT = 65536


def put_many(arrays: Sequence[np.ndarray], shardings: Sequence[Any]) -> list[jax.Array]:
    """``jax.device_put(arrays, shardings)`` for shardings that each hold one device."""
    try:
        from jax._src import core
        from jax._src.lib import xla_client as xc

        out: list[Any] = []
        slow: list[int] = []
        avals = _avals  # one per shape and dtype: most of the per-array Python
        if len(avals) > _AVALS_KEPT:  # shapes of trees restored long ago
            avals.clear()
        devices: dict[int, Any] = {}  # id(sharding) -> its device (``shardings`` keeps them)
        canonical: dict[np.dtype, bool] = {}  # dtype -> whether JAX keeps it as it is
        for i, (a, s) in enumerate(zip(arrays, shardings, strict=True)):
            same = canonical.get(a.dtype)
            if same is None:
                same = canonical[a.dtype] = jax.dtypes.canonicalize_dtype(a.dtype) == a.dtype
            if not same or not a.flags.c_contiguous:
                out.append(None)
                slow.append(i)
                continue
            device = devices.get(id(s))
            if device is None:
                (device,) = s.device_set
                devices[id(s)] = device
            aval = avals.get((a.shape, a.dtype))
            if aval is None:
                aval = avals[a.shape, a.dtype] = core.ShapedArray(a.shape, a.dtype)
            out.append(xc.batched_device_put(aval, s, [a], [device], True))
        if out and slow != list(range(len(out))):
            first = next(y for y in out if y is not None)
            if not isinstance(first, jax.Array):
                raise TypeError(type(first))
    except Exception:  # a private API changed: the public path gives the same arrays
        return list(jax.device_put(list(arrays), list(shardings)))
    if slow:
        for i, y in zip(
            slow,
            jax.device_put([arrays[i] for i in slow], [shardings[i] for i in slow]),
            strict=True,
        ):
            out[i] = y
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A host copy of ``x``, an array on one accelerator, that the caller owns.

    It goes through the device's pinned host memory when the backend has it: the transfer
    then runs at the bus's speed (a pageable one, what ``np.asarray`` does, ran ~30 times
    slower on an H100 VM), and JAX's pinned allocator reuses that memory from one save to
    the next. The NumPy array is a view of the pinned buffer (DLPack), which it keeps alive.
    """
    try:
        pinned = jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
    except Exception:  # no pinned host memory here
        return np.asarray(x)
    try:
        return np.from_dlpack(pinned)
    except Exception:  # no DLPack view of it: a copy out of the pinned buffer
        return np.asarray(pinned)


def to_host_many(xs: Sequence[jax.Array]) -> list[np.ndarray]:
    """Host copies of ``xs`` (arrays on one accelerator each) that the caller owns, moved
    together.

    One ``jax.device_put`` to the devices' pinned host memory for all of them: the transfers
    are all queued before any is waited for, so the copy engines never idle between arrays
    (what an async save of a device without room for device copies waits for). JAX's pinned
    allocator keeps that memory from one save to the next: only the first save in a process
    pays for pinning it. Falls back to :func:`to_host` one array at a time.
    """
    xs = list(xs)
    if not xs:
        return []
    try:
        pinned = jax.block_until_ready(
            jax.device_put(xs, [x.sharding.with_memory_kind("pinned_host") for x in xs])
        )
    except Exception:  # no pinned host memory here
        return [to_host(x) for x in xs]
    out = []
    for p in pinned:
        try:
            out.append(np.from_dlpack(p))
        except Exception:  # no DLPack view of it: a copy out of the pinned buffer
            out.append(np.asarray(p))
    return out
