"""The one module that speaks to TensorStore: zarr v3 array specs, key-value stores, commit.

Locations (local directories, ``s3://`` and ``gs://`` prefixes) and the commit protocol live in
:mod:`jaxckpt._locations`, re-exported here so that callers speak to this module only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from .. import _runtime
from .._errors import CheckpointError, CorruptCheckpointError
from .chunk_files import json_bytes
from .locations import COMMIT as COMMIT
from .locations import PENDING as PENDING
from .locations import TMP_MARK as TMP_MARK
from .locations import begin as begin
from .locations import commit as commit
from .locations import exists as exists
from .locations import hold_writer as hold_writer
from .locations import is_committed as is_committed
from .locations import is_debris as is_debris
from .locations import is_dir as is_dir
from .locations import is_local as is_local
from .locations import is_url as is_url
from .locations import join as join
from .locations import kvstore as kvstore
from .locations import list_keys as list_keys
from .locations import list_names as list_names
from .locations import local_error as local_error
from .locations import make_dirs as make_dirs
from .locations import missing as missing
from .locations import normalize as normalize
from .locations import occupied as occupied
from .locations import open_kv as open_kv
from .locations import parse_json as parse_json
from .locations import read_bytes as read_bytes
from .locations import read_json as read_json
from .locations import read_jsons as read_jsons
from .locations import release_writer as release_writer
from .locations import remove as remove
from .locations import remove_if_abandoned as remove_if_abandoned
from .locations import remove_tree as remove_tree
from .locations import retire as retire
from .locations import save_error as save_error
from .locations import storage_error as storage_error
from .locations import tmp_sibling as tmp_sibling
from .locations import write_bytes_atomic as write_bytes_atomic
from .locations import write_bytes_durable as write_bytes_durable

CHUNK_BYTES = 64 << 20  # largest chunk a single array is cut into, unless its shards say otherwise


# ---------------------------------------------------------------------------- small files


def write_json_files(kv: ts.KvStore, files: dict[str, Any]) -> list[ts.Future]:
    """Every file (bytes, or a JSON value as ``json_bytes`` encodes it: the bytes whose
    checksums ``COMMIT`` holds)."""
    return [
        kv.write(key, obj if isinstance(obj, bytes) else json_bytes(obj))
        for key, obj in files.items()
    ]


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


def _array_spec(root: str, rel: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "driver": "zarr3",
        "kvstore": {**kvstore(root), "path": kvstore(root)["path"] + rel + "/"},
        "metadata": {k: v for k, v in meta.items() if k not in ("zarr_format", "node_type")},
    }


def open_array(
    root: str,
    rel: str,
    meta: dict[str, Any],
    *,
    create: bool,
    peer_creates: bool = False,
    assume: bool = True,
    fill_missing: bool = False,
) -> ts.Future:
    """Opens an array to read, or with ``create`` to write; ``peer_creates``: another process
    writes its ``zarr.json`` (a multi-process save), this one only writes chunks;
    ``assume=False`` reads its zarr.json, which must agree with ``meta`` (``{}``: any array),
    instead of trusting ``meta``; ``fill_missing`` reads
    a missing chunk as zeros (an array whose record lists absent zero chunks), else it is an
    error."""
    spec = _array_spec(root, rel, meta)
    if create:
        # Every chunk is written, zeros included: no record lists chunks TensorStore skipped.
        spec["store_data_equal_to_fill_value"] = True
        if peer_creates:
            return ts.open(
                spec, open=True, assume_metadata=True, write=True, context=_runtime.context()
            )
        if is_url(root):
            return _create_remote(root, rel, meta, spec)
        # open=True too: the local fast path may have written this array's zarr.json already.
        return ts.open(spec, create=True, open=True, context=_runtime.context())
    spec["fill_missing_data_reads"] = fill_missing
    return ts.open(spec, open=True, assume_metadata=assume, read=True, context=_runtime.context())


def _create_remote(root: str, rel: str, meta: dict[str, Any], spec: dict[str, Any]) -> ts.Future:
    """One PUT of ``zarr.json``, then the array opened on it with no request at all.

    ``create=True`` would first GET the metadata and, on S3, HEAD it before a conditional PUT
    (3 requests per array); the prefix is this save's own, so nothing there can be lost.
    """
    put = open_kv(root).write(f"{rel}/zarr.json", json_bytes(meta))
    opened = ts.open(spec, open=True, assume_metadata=True, context=_runtime.context())
    promise, future = ts.Promise.new()  # type: ignore[var-annotated]

    def settle(_: Any) -> None:
        for f in (put, opened):
            if f.exception() is not None:
                promise.set_exception(f.exception())
                return
        promise.set_result(opened.result())

    put.add_done_callback(lambda _: opened.add_done_callback(settle))
    return future


def read_error(root: str, path: str, e: Exception) -> CheckpointError:
    if _unreachable(e):  # the store refused or failed after its retries: not the bytes' fault
        return storage_error(root, e, path)
    return CorruptCheckpointError(
        f"Reading the array {path!r} of {root} failed: {e}. The checkpoint is damaged (a chunk "
        "fails its crc32c checksum or is missing). Fix: restore an earlier checkpoint, or run "
        f"`jaxckpt verify {root}` to list every damaged array."
    )


def _unreachable(e: Exception) -> bool:
    """Whether a TensorStore error comes from the storage service rather than the bytes read."""
    msg = str(e)
    return "http_response_code" in msg or msg.startswith(("UNAVAILABLE", "PERMISSION_DENIED"))
