"""What a reader checks in a checkpoint's records before it trusts them.

Every leaf record is checked when the reader first hands it out, before anything is allocated
or planned from it, and an array's own ``zarr.json`` is compared with its record before the
array is read (:mod:`jaxckpt._confine` keeps the paths inside the checkpoint). docs/format.md
lists the rules ("What a reader enforces").
"""

from __future__ import annotations

import base64
import functools
import math
from typing import Any, cast

import numpy as np

from jaxckpt.format import metadata as _metadata
from jaxckpt.format.metadata import Record
from jaxckpt.storage.confine import Violation, _json, _short, path_problem

# ---------------------------------------------------------------------------- records

MAX_NDIM = 32  # zarr v3's and TensorStore's limit
MAX_BYTES = 1 << 62  # no array of more bytes exists; a larger size is a crafted number
GRID_MIN = 65536  # chunks any array may have; a larger array may have one per KiB
PACK_CHUNK_MAX = 64 << 20  # a pack's chunk, read whole into memory (jaxckpt writes 1 MiB ones)


def grid_limit(nbytes: int) -> int:
    """The most chunks an array of ``nbytes`` may be cut into: planning a read costs memory
    and time per chunk, so a 2 MiB array claiming 2 million chunks is refused."""
    return max(GRID_MIN, nbytes // 1024)


def leaf_problem(rec: Any) -> str | None:
    """What is wrong with a leaf record, or None: checked before anything is allocated or
    planned from it (its files are checked when read)."""
    if not isinstance(rec, dict):
        return f"has the record {_short(rec)}, which is not a JSON object"
    rec = cast(Record, rec)  # a JSON object: its fields are checked below
    t = rec["t"]
    if t == "array":
        return _array_problem(rec)
    if t == "value":
        return _value_problem(rec)
    if not isinstance(rec.get("v"), str) or not isinstance(rec.get("cls"), str):
        return "has a state record without its class name or encoded state"
    per = rec.get("per_process")
    if per is not None and not (isinstance(per, list) and all(isinstance(v, str) for v in per)):
        return "has a per_process state list that is not a list of encoded states"
    return None


def _array_problem(rec: Record) -> str | None:
    dtype = _dtype(rec.get("dtype"))
    if dtype is None:
        return (
            f"has the dtype {_short(rec.get('dtype'))}, which jaxckpt does not save (it saves "
            "numeric and bool dtypes, by their NumPy names)"
        )
    shape = rec.get("shape")
    if type(shape) is not list or len(shape) > MAX_NDIM or not _naturals(shape):
        return (
            f"has the shape {_short(shape)}: a shape is a list of at most {MAX_NDIM} "
            "non-negative integers"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_BYTES:
        return f"claims {nbytes} bytes (shape {shape}, {dtype.name})"
    problem = path_problem(rec.get("loc"))
    if problem is not None:
        return problem
    if "packed" in rec:
        packed = rec["packed"]
        if (
            type(packed) is not list
            or len(packed) != 3
            or not _naturals(packed)
            or packed[1] != nbytes
            or packed[2] < 1
            or packed[0] + nbytes > MAX_BYTES
        ):
            return (
                f"has the packed place {_short(packed)}, not [offset, nbytes, chunk_bytes] with "
                f"nbytes = {nbytes} (shape {shape}, {dtype.name}) and chunk_bytes >= 1"
            )
        crc = rec.get("crc32c")
        if crc is not None and not (type(crc) is int and 0 <= crc < 1 << 32):
            return f"has the crc32c {_short(crc)}, not a 32-bit unsigned integer"
    else:
        problem = _chunks_problem(rec, shape, dtype, nbytes)
        if problem is not None:
            return problem
    scalar = rec.get("np_scalar")
    if scalar is not None and (type(scalar) is not bool or (scalar and shape)):
        return f"has np_scalar {_short(scalar)} with the shape {shape} (true only for shape [])"
    if "key" in rec:
        return _key_problem(rec, shape, dtype)
    return None


def _naturals(xs: list[Any]) -> bool:
    """Whether every item of ``xs`` (a few: a shape, a packed place) is an int >= 0 (bools
    are not)."""
    for x in xs:
        if type(x) is not int or x < 0:
            return False
    return True


def _chunks_problem(rec: Record, shape: list[int], dtype: np.dtype, nbytes: int) -> str | None:
    chunks = rec.get("chunks")
    if (
        type(chunks) is not list
        or len(chunks) != len(shape)
        or not all(
            type(c) is int and 1 <= c <= max(1, d) for c, d in zip(chunks, shape, strict=True)
        )
    ):
        return (
            f"has the chunks {_short(chunks)} for the shape {shape}: one chunk size per "
            "dimension, each from 1 to the dimension's size"
        )
    n = math.prod(-(-d // c) for d, c in zip(shape, chunks, strict=True))
    if n > grid_limit(nbytes):
        return (
            f"cuts its {nbytes} bytes into {n} chunks (shape {shape}, chunks {chunks}); a "
            f"reader takes at most {grid_limit(nbytes)}"
        )
    if "stored" in rec:
        stored = _dtype(rec["stored"])
        if stored is None or stored.itemsize != dtype.itemsize:
            return (
                f"is stored as {_short(rec['stored'])}, not a numeric dtype of the "
                f"{dtype.itemsize} bytes of its dtype {dtype.name}"
            )
    zero = rec.get("zero_chunks")
    if zero is not None and zero != "all":
        if type(zero) is not list or not all(type(k) is int for k in zero):
            return f'lists the zero chunks {_short(zero)}: "all" or chunk indices'
        if any(a >= b for a, b in zip(zero, zero[1:], strict=False)) or (
            zero and not 0 <= zero[0] <= zero[-1] < n
        ):
            return (
                f"lists the zero chunks {_short(zero)}: sorted distinct chunk indices "
                f"from 0 to {n - 1}"
            )
    return None


def _key_problem(rec: Record, shape: list[int], dtype: np.dtype) -> str | None:
    impl, key_shape = rec.get("key"), rec.get("key_shape")
    if (
        not isinstance(impl, str)
        or not isinstance(rec.get("key_dtype"), str)
        or key_shape != shape[:-1]
        or not _key_impl_ok(impl, tuple(shape[-1:]), dtype.name)
    ):
        return (
            f"has the PRNG key record {_short({k: rec.get(k) for k in ('key', 'key_dtype', 'key_shape')})} "
            f"for key data of shape {shape} and dtype {dtype.name}, which JAX cannot wrap"
        )
    return None


@functools.lru_cache(maxsize=64)
def _key_impl_ok(impl: str, tail: tuple[int, ...], dtype: str) -> bool:
    """Whether key data ending in ``tail`` wraps into keys of the PRNG implementation ``impl``."""
    import jax

    if len(tail) != 1 or tail[0] > 64:
        return False
    try:
        jax.random.wrap_key_data(jax.numpy.zeros(tail, dtype), impl=impl)
    except (ValueError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=256)
def dtype_named(name: str) -> np.dtype | None:
    """The dtype named ``name`` if it is one jaxckpt saves, else None: also how code holding a
    checked record turns its dtype name into a dtype (comparing a dtype with a name parses
    the name every time)."""
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        return None
    if dtype.name != name or _metadata.unsupported(dtype):
        return None
    return dtype


def _dtype(name: Any) -> np.dtype | None:
    """The dtype a record names, if it is one jaxckpt saves (spelled as jaxckpt writes it)."""
    return dtype_named(name) if isinstance(name, str) else None


_PY_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "float": (int, float, str),
    "complex": (list,),
    "str": (str,),
    "bytes": (str,),
}


def _value_problem(rec: Record) -> str | None:
    py: Any = rec.get("py")
    v: Any = rec.get("v")
    types = _PY_TYPES.get(py) if isinstance(py, str) else None
    ok = types is not None and type(v) in types
    try:
        if ok and py == "float" and isinstance(v, str):
            float(v)
        elif ok and py == "complex":
            ok = len(v) == 2 and all(isinstance(x, str) for x in v)
            ok = ok and complex(float(v[0]), float(v[1])) is not None
        elif ok and py == "bytes":
            base64.b64decode(v, validate=True)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        return f"has the Python value record {_short({'py': py, 'v': v})}, which cannot be decoded"
    return None


# ---------------------------------------------------------------------------- zarr.json


def _described(doc: Any) -> tuple[Any, Any, Any] | str:
    """``(shape, data_type, chunk_shape)`` of an array's ``zarr.json``, or what makes it
    other than the arrays jaxckpt writes (regular chunks, default keys, bytes little-endian
    then crc32c, fill value zero)."""
    if not isinstance(doc, dict) or doc.get("node_type") != "array":
        return "is not an array's metadata"
    grid: Any = doc.get("chunk_grid")
    keys: Any = doc.get("chunk_key_encoding")
    codecs: Any = doc.get("codecs")
    conf = grid.get("configuration") if isinstance(grid, dict) else None
    if not isinstance(conf, dict) or grid.get("name") != "regular":
        return "has no regular chunk grid"
    sep = keys.get("configuration", {}).get("separator", "/") if isinstance(keys, dict) else None
    if not isinstance(keys, dict) or keys.get("name") != "default" or sep != "/":
        return "has chunk keys other than the default ones"
    names = [c.get("name") for c in codecs] if isinstance(codecs, list) else []
    if (
        names != ["bytes", "crc32c"]
        or not all(isinstance(c, dict) for c in codecs)
        or (codecs[0].get("configuration") or {}).get("endian", "little") != "little"
    ):
        return "has codecs other than bytes (little endian) then crc32c"
    fill = doc.get("fill_value")
    if not (
        fill is False
        or (type(fill) in (int, float) and fill == 0)
        or (isinstance(fill, list) and len(fill) == 2 and all(x in (0, 0.0) for x in fill))
    ):
        return f"has the fill value {_short(fill)}, not zero"
    return doc.get("shape"), doc.get("data_type"), conf.get("chunk_shape")


def array_json_problem(rec: Record, doc: Any, path: str) -> str | None:
    """What makes the ``zarr.json`` of an array (``doc``, read from ``path``) disagree with
    the array's leaf record, if anything: checked before its chunks are read."""
    got = _described(doc)
    if isinstance(got, str):
        return f"has array metadata {path} that {got}"
    want = (rec["shape"], rec.get("stored", rec["dtype"]), rec["chunks"])
    if got != want:
        w, g = ([_json(x) for x in t] for t in (want, got))
        return (
            f"is recorded with shape {w[0]}, data type {w[1]} and chunks {w[2]}, but its array "
            f"metadata {path} says shape {g[0]}, data type {g[1]} and chunks {g[2]}"
        )
    return None


def pack_problem(length: Any, data_type: Any, chunk: Any, where: str) -> str | None:
    """What makes a pack (a 1-D uint8 array of ``length`` bytes in chunks of ``chunk``, its
    metadata at ``where``) other than what its leaves' records need, if anything."""
    if (
        data_type != "uint8"
        or type(length) is not int
        or type(chunk) is not int
        or not 0 <= length <= MAX_BYTES
        or not 1 <= chunk <= PACK_CHUNK_MAX
        or -(-length // chunk) > grid_limit(length)
    ):
        return (
            f"is packed in an array whose metadata {where} says {_short(length)} bytes of "
            f"{_short(data_type)} in chunks of {_short(chunk)}, not a uint8 array of at most "
            f"{grid_limit(max(0, length) if type(length) is int else 0)} chunks of at most "
            f"{PACK_CHUNK_MAX} bytes"
        )
    return None


def pack_json(doc: Any, where: str) -> tuple[int, int]:
    """``(length, chunk_bytes)`` of a pack's ``zarr.json``; raises ``Violation`` if it is not
    a pack jaxckpt writes."""
    got = _described(doc)
    if isinstance(got, str):
        raise Violation(f"is packed in an array whose metadata {where} {got}")
    shape, data_type, chunks = got
    ok = isinstance(shape, list) and isinstance(chunks, list) and len(shape) == len(chunks) == 1
    length, chunk = (shape[0], chunks[0]) if ok else (shape, chunks)
    problem = pack_problem(length, data_type, chunk, where)
    if problem is not None:
        raise Violation(problem)
    return length, chunk


def packed_problem(rec: Record, length: int, chunk: int) -> str | None:
    """What makes a packed leaf's place disagree with its pack (``length`` bytes in chunks of
    ``chunk``), if anything."""
    offset, nbytes, size = rec["packed"]
    if size != chunk or offset + nbytes > length:
        return (
            f"is recorded at bytes {offset} to {offset + nbytes} of its pack in chunks of "
            f"{size}, but the pack holds {length} bytes in chunks of {chunk}"
        )
    return None
