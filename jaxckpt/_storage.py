"""The one module that speaks to TensorStore: zarr v3 array specs, key-value stores, commit.

Paths are local directories for now; every byte goes through a TensorStore kvstore so that
object stores can be added behind the same functions.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from ._errors import CorruptCheckpointError

COMMIT = "COMMIT"
TMP_MARK = ".jaxckpt-tmp-"
CHUNK_BYTES = 64 << 20  # largest chunk a single array is cut into, unless its shards say otherwise

_context: ts.Context | None = None


def context() -> ts.Context:
    """One shared TensorStore context: one cache pool and one I/O concurrency limit."""
    global _context
    if _context is None:
        _context = ts.Context(
            {"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": "shared"}}
        )
    return _context


# ---------------------------------------------------------------------------- locations


def normalize(path: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(path))


def kvstore(root: str) -> dict[str, Any]:
    return {"driver": "file", "path": root.rstrip("/") + "/"}


def tmp_sibling(final: str) -> str:
    parent, name = os.path.split(final)
    return os.path.join(parent, f"{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def is_local(root: str) -> bool:
    """Whether ``root`` is a local directory (chunk files then bypass TensorStore)."""
    return "://" not in root


def exists(root: str, key: str = "") -> bool:
    return os.path.exists(os.path.join(root, key))


def is_committed(root: str) -> bool:
    return os.path.isfile(os.path.join(root, COMMIT))


def is_dir(root: str) -> bool:
    return os.path.isdir(root)


def remove_tree(root: str) -> None:
    shutil.rmtree(root, ignore_errors=True)


def commit(tmp: str, final: str) -> None:
    """Makes ``tmp`` appear as ``final`` atomically; ``COMMIT`` inside it is already durable."""
    _fsync_dir(tmp)
    os.rename(tmp, final)  # fails on a non-empty ``final``: never clobbers a checkpoint
    _fsync_dir(os.path.dirname(final))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- small files


def open_kv(root: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore(root), context=context()).result()


def write_json_files(kv: ts.KvStore, files: dict[str, Any]) -> list[ts.Future]:
    return [kv.write(key, json.dumps(obj, separators=(",", ":")).encode()) for key, obj in files.items()]


def read_json(root: str, key: str) -> Any:
    path = os.path.join(root, key)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(
            f"{path} is not valid JSON ({e}); the checkpoint's metadata is damaged. Fix: restore "
            "an earlier checkpoint."
        ) from e


def write_bytes_durable(root: str, key: str, data: bytes) -> None:
    path = os.path.join(root, key)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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


def stored_dtype(dtype: np.dtype) -> str:
    """The zarr ``data_type`` an array of ``dtype`` is stored as (same bytes, else a uint view)."""
    if dtype.kind != "V" and dtype.name.isidentifier() and _zarr3_supports(dtype.name):
        return dtype.name
    return f"uint{dtype.itemsize * 8}"


def chunk_shape(shape: Sequence[int], itemsize: int, shard: Sequence[int] | None = None) -> list[int]:
    """Chunks follow the shards; a chunk over ``CHUNK_BYTES`` is cut along its first dims."""
    chunk = [max(1, int(d)) for d in (shard if shard is not None else shape)]
    for axis in range(len(chunk)):
        while int(np.prod(chunk)) * itemsize > CHUNK_BYTES and chunk[axis] > 1:
            # halve while it still divides, to keep chunk boundaries on shard boundaries
            if chunk[axis] % 2:
                break
            chunk[axis] //= 2
    return chunk


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


def open_array(root: str, rel: str, meta: dict[str, Any], *, create: bool, assume: bool = True) -> ts.Future:
    """Opens one zarr array; ``assume=False`` reads its zarr.json instead of trusting ``meta``."""
    spec = _array_spec(root, rel, meta)
    if create:
        # Every chunk is written, zeros included: a missing chunk then always means damage.
        spec["store_data_equal_to_fill_value"] = True
        # open=True too: the fast path may have written this array's zarr.json already.
        return ts.open(spec, create=True, open=True, context=context())
    spec["fill_missing_data_reads"] = False
    if not assume:
        del spec["metadata"]
    return ts.open(spec, open=True, assume_metadata=assume, read=True, context=context())


def read_error(root: str, path: str, e: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Reading the array {path!r} of {root} failed: {e}. The checkpoint is damaged (a chunk "
        "fails its crc32c checksum or is missing). Fix: restore an earlier checkpoint, or run "
        f"`jaxckpt verify {root}` to list every damaged array."
    )


# ---------------------------------------------------------------------------- directories
# What CheckpointManager needs of a directory of checkpoints. The manager calls only these, so a
# directory can become an object-store prefix behind the same functions.


def join(root: str | os.PathLike[str], name: str) -> str:
    """``root/name``, keeping ``root`` as the caller spelled it (relative paths stay relative)."""
    return os.fspath(root).rstrip("/") + "/" + name


def list_names(root: str) -> list[str]:
    """The names directly inside ``root``, sorted; empty when ``root`` does not exist."""
    try:
        return sorted(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []


def make_dirs(root: str) -> None:
    os.makedirs(root, exist_ok=True)


def is_debris(name: str) -> bool:
    """Whether ``name`` is left over by a jaxckpt write that never committed."""
    return TMP_MARK in name


def remove(path: str) -> None:
    """Removes a file or a directory tree; a missing ``path`` is not an error."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def delete_checkpoint(path: str) -> None:
    """Deletes a committed checkpoint so that no crash leaves it half-deleted but listed.

    It is first renamed to a debris name (one atomic step: it stops being a checkpoint), then
    removed; a crash in between leaves debris that the next manager cleans up.
    """
    doomed = tmp_sibling(path)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    remove(doomed)


def read_bytes(root: str, key: str) -> bytes | None:
    """The bytes of ``root/key``, or None when it does not exist."""
    try:
        with open(os.path.join(root, key), "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def write_bytes_atomic(root: str, key: str, data: bytes) -> None:
    """Replaces ``root/key`` with ``data`` atomically: readers see the old or the new bytes."""
    final = os.path.join(root, key)
    tmp = tmp_sibling(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        remove(tmp)
        raise
    _fsync_dir(root)
