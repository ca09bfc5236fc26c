"""What a zarr v3 array jaxckpt writes looks like: its ``zarr.json``, chunk shape and stored
data type. Stores open the arrays (:meth:`jaxckpt.storage.base.Store.open_array`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

CHUNK_BYTES = 64 << 20  # largest chunk a single array is cut into, unless its shards say otherwise


# ---------------------------------------------------------------------------- groups


def group_json(attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


# ---------------------------------------------------------------------------- arrays


@functools.cache
def _zarr3_supports(data_type: str) -> bool:
    """Whether this TensorStore's zarr3 driver stores ``data_type`` (asked once, in memory)."""
    meta = array_metadata([1], data_type, [1])
    spec = {"driver": "zarr3", "kvstore": {"driver": "memory"}, "metadata": meta}
    spec["metadata"] = {k: v for k, v in meta.items() if k not in ("zarr_format", "node_type")}
    try:
        ts.open(spec, create=True).result()
    except (ValueError, TypeError):
        return False
    return True


@functools.cache
def stored_dtype(dtype: np.dtype) -> str:
    """The zarr ``data_type`` an array of ``dtype`` is stored as (same bytes, else a uint view)."""
    if dtype.kind != "V" and dtype.name.isidentifier() and _zarr3_supports(dtype.name):
        return dtype.name
    return f"uint{dtype.itemsize * 8}"


def chunk_shape(
    shape: Sequence[int], itemsize: int, shard: Sequence[int] | None = None
) -> list[int]:
    """Chunks follow the shards; a chunk over ``CHUNK_BYTES`` is cut along its first dims."""
    return list(_chunk_shape(tuple(shard if shard is not None else shape), itemsize, CHUNK_BYTES))


@functools.lru_cache(maxsize=4096)  # a training loop saves the same shapes every time
def _chunk_shape(shape: tuple[int, ...], itemsize: int, most: int) -> tuple[int, ...]:
    chunk = [max(1, int(d)) for d in shape]
    for axis in range(len(chunk)):
        while int(np.prod(chunk)) * itemsize > most and chunk[axis] > 1:
            # halve while it still divides, to keep chunk boundaries on shard boundaries
            if chunk[axis] % 2:
                break
            chunk[axis] //= 2
    return tuple(chunk)


def array_metadata(shape: Sequence[int], data_type: str, chunks: Sequence[int]) -> dict[str, Any]:
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": _fill_value(data_type),
        "codecs": [*codecs, {"name": "crc32c"}],
        "attributes": {},
    }


def _fill_value(data_type: str) -> Any:
    if data_type == "bool":
        return False
    return [0.0, 0.0] if data_type.startswith("complex") else 0


__all__ = ["CHUNK_BYTES", "array_metadata", "chunk_shape", "group_json", "stored_dtype"]
