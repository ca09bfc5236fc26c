"""The tree structure and the leaf records kept in the root ``zarr.json``.

A big record is split over the group files of its subtrees (:mod:`jaxckpt.format.split`).

A saved tree is described by one JSON value, ``tree``: an inner node is
``{"t": "dict"|"list"|"tuple"|"obj"|"none", "c": [[kind, key, child], ...]}`` (``obj`` is a
named tuple, dataclass or other registered node, with its class name in ``"cls"``); a leaf is
``{"t": "array", ...}``, ``{"t": "value", ...}`` or ``{"t": "state", ...}``. Edge kinds and
names are those of :mod:`jaxckpt.format.paths`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import gc
import math
from collections.abc import Callable, Iterator
from typing import Any, TypedDict, cast

import jax
import msgpack
import numpy as np

from jaxckpt.errors import CorruptCheckpointError, FormatVersionError, UnsupportedLeafError
from jaxckpt.format import paths as _paths

FORMAT_VERSION = 3  # 3: COMMIT holds the checksums of the metadata (see _commit)
LEAF_KINDS = ("array", "value", "state")  # the "t" of a leaf record; any other is a node
ATTR_KEY = "jaxckpt"
MAX_NAME_BYTES = 255  # the longest file name common file systems take

PyTree = Any


class Record(TypedDict, total=False):
    """A node or leaf of the structure record (docs/format.md, "The structure record"), as
    it is in the JSON of the root ``zarr.json``: ``t`` says which kind, the other fields are
    those of that kind. A reader checks every leaf record before it uses it
    (:func:`jaxckpt.format.validate.leaf_problem`)."""

    t: str  # a node: "dict", "list", "tuple", "obj", "none"; a leaf: "array", "value", "state"
    c: list[list[Any]]  # a node's children: [kind, key, child record], in flatten order
    cls: str  # an "obj" node's class; a "state" leaf's class
    # "array"
    dtype: str  # the saved dtype's name ("float32", "bfloat16", "key<fry>")
    shape: list[int]
    chunks: list[int]
    loc: str  # the zarr array's path, relative to the checkpoint
    stored: str  # the zarr data type the bytes are stored as, where it differs from dtype
    packed: list[int]  # [offset, bytes, pack chunk] of a leaf in the pack at loc
    key: str  # a typed PRNG key's implementation; shape and dtype are its key data's
    key_dtype: str  # a typed key's dtype name ("key<fry>") and shape, as the caller sees it
    key_shape: list[int]
    np_scalar: bool  # a NumPy scalar (np.float32(1.0)), not a 0-d array
    zero_chunks: Any  # "all", or the flat indices of the all-zero chunks left unwritten
    crc32c: int  # a packed leaf's own CRC-32C (its bytes in the pack)
    # "value" and "state"
    py: str  # a value's Python type: "bool", "int", "float", "complex", "str", "bytes", "none"
    v: Any  # the value (or the state's msgpack bytes, base64)
    per_process: list[Any]  # a "state" leaf saved by several processes: each one's own state
    split: bool  # a stub: the node's record is in its group's zarr.json (docs/format.md)


@dataclasses.dataclass
class Leaf:
    """One leaf found while walking a tree to save it."""

    keypath: tuple[Any, ...]
    path: str  # "params/l1/kernel"
    value: Any
    record: Record


def is_stateful(x: Any) -> bool:
    return callable(getattr(x, "get_state", None)) and callable(getattr(x, "set_state", None))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _flatten_one(node: Any) -> tuple[list[tuple[Any, Any]], Any] | None:
    """One level of a pytree node: ``([(key, child), ...], treedef)``, or None for a leaf."""
    if _is_array(node) or is_stateful(node) or isinstance(node, (str, bytes, int, float, complex)):
        return None
    items, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
    treedef = cast(Any, treedef)  # PyTreeDef's stubs lack num_leaves / num_nodes
    if treedef.num_leaves == 1 and treedef.num_nodes == 1 and items and items[0][1] is node:
        return None
    return [(kp[0], child) for kp, child in items], treedef


def _node_type(node: Any) -> str:
    if node is None:
        return "none"
    if isinstance(node, list):
        return "list"
    if type(node) is tuple:
        return "tuple"
    if isinstance(node, dict) or type(node).__name__ in ("FrozenDict", "State"):
        return "dict"
    return "obj"


def value_record(x: Any, where: str) -> Record:
    """The record of a non-array leaf kept inline in the metadata."""
    if isinstance(x, bool):
        return {"t": "value", "py": "bool", "v": x}
    if isinstance(x, int):
        return {"t": "value", "py": "int", "v": x}
    if isinstance(x, float):
        return {"t": "value", "py": "float", "v": x if math.isfinite(x) else repr(x)}
    if isinstance(x, complex):
        return {"t": "value", "py": "complex", "v": [repr(x.real), repr(x.imag)]}
    if isinstance(x, str):
        return {"t": "value", "py": "str", "v": x}
    if isinstance(x, bytes):
        return {"t": "value", "py": "bytes", "v": base64.b64encode(x).decode()}
    if is_stateful(x):
        try:
            packed = msgpack.packb(x.get_state(), default=_pack_ext, strict_types=False)
        except Exception as e:
            raise UnsupportedLeafError(
                f"The state of the {type(x).__name__} at {where} could not be serialised "
                f"({e}). Fix: make get_state() return a tree of dicts, lists, numbers, str, "
                "bytes and NumPy arrays."
            ) from e
        return {"t": "state", "cls": _cls_name(x), "v": base64.b64encode(packed).decode()}
    raise UnsupportedLeafError(
        f"The leaf at {where} is a {_cls_name(x)}, which jaxckpt cannot save: it expects a "
        "jax.Array, np.ndarray, NumPy or Python scalar, str, bytes, None, or an object with "
        "get_state()/set_state(). Fix: turn it into an array or a Python scalar, give it "
        "get_state()/set_state() methods, or take it out of the tree (e.g. register its class "
        "with jax.tree_util.register_dataclass so that its fields are saved)."
    )


def is_key(x: Any) -> bool:
    """Whether ``x`` (an array or ``ShapeDtypeStruct``) holds typed PRNG keys."""
    dtype = getattr(x, "dtype", None)
    try:
        return _is_key_dtype(dtype)
    except TypeError:  # unhashable
        return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))


@functools.cache
def _is_key_dtype(dtype: Any) -> bool:
    return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))


def key_record(x: Any) -> Record:
    """What a typed key array adds to its array record (which describes its key data)."""
    return {
        "key": str(jax.random.key_impl(x)),
        "key_dtype": str(x.dtype),
        "key_shape": list(x.shape),
    }


def load_key(rec: Record, data: np.ndarray) -> jax.Array:
    """The typed key array saved as ``data`` (its key data)."""
    return jax.random.wrap_key_data(jax.numpy.asarray(data), impl=rec["key"])


@functools.cache
def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, which NumPy computes anew on every call (a save asks once per leaf)."""
    return dtype.name


@functools.cache
def unsupported(dtype: np.dtype) -> bool:
    """Whether jaxckpt refuses to save arrays of ``dtype`` (and a reader to read them)."""
    odd = dtype.kind in "OUSMm" or dtype.fields is not None or dtype.name.startswith("void")
    return odd or (dtype.kind in "fc" and dtype.itemsize > 16 // (2 if dtype.kind == "f" else 1))


def check_array(x: Any, keypath: tuple[Any, ...]) -> None:
    """Raises ``UnsupportedLeafError`` for an array leaf jaxckpt cannot store bit-exactly."""
    if isinstance(x, jax.core.Tracer):
        raise UnsupportedLeafError(
            f"The leaf at {_paths.keystr(keypath)} is a traced value (inside jit, grad or vmap), but a checkpoint "
            "holds concrete arrays. Fix: call jc.save outside the traced function, on its "
            "outputs."
        )
    if is_key(x):
        return
    dtype = np.dtype(x.dtype)
    if unsupported(dtype):
        raise UnsupportedLeafError(
            f"The array at {_paths.keystr(keypath)} has dtype {dtype}, which jaxckpt cannot save: it expects a "
            "numeric or bool dtype (the dtypes JAX uses, bfloat16/float8/int4 included). Fix: "
            "convert it (e.g. np.asarray(x, np.float32)), or save str/bytes values as plain "
            "Python str or bytes leaves."
        )


def load_value(rec: Record) -> Any:
    py, v = rec["py"], rec["v"]
    if py == "float":
        return float(v)
    if py == "complex":
        return complex(float(v[0]), float(v[1]))
    if py == "bytes":
        return base64.b64decode(v)
    return v


def load_state(rec: Record) -> Any:
    return msgpack.unpackb(
        base64.b64decode(rec["v"]), ext_hook=_unpack_ext, strict_map_key=False, use_list=True
    )


def _pack_ext(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        arr = np.asarray(obj)
        head = msgpack.packb(
            [arr.dtype.str if arr.dtype.kind != "V" else arr.dtype.name, list(arr.shape)]
        )
        return msgpack.ExtType(1, head + np.ascontiguousarray(arr).tobytes())
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _unpack_ext(code: int, data: bytes) -> Any:
    if code != 1:
        return msgpack.ExtType(code, data)
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    dtype, shape = next(unpacker)
    offset = unpacker.tell()
    return np.frombuffer(data[offset:], dtype=np.dtype(dtype)).reshape(shape).copy()


def _cls_name(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def describe(tree: PyTree, array_record: Callable[[str, Any], Record]) -> tuple[Record, list[Leaf]]:
    """Walks ``tree``: returns its structure record and its leaves in flatten order.

    ``array_record(path, array)`` makes the record of an array leaf.
    """
    leaves: list[Leaf] = []

    def walk(node: Any, keypath: tuple[Any, ...], names: tuple[str, ...]) -> Record:
        flat = _flatten_one(node)
        if flat is None:
            path = "/".join(names)
            value = node
            if _is_array(node):
                check_array(node, keypath)
                if is_key(node):  # typed PRNG keys: stored as their key data
                    value = jax.random.key_data(node)
                rec = array_record(path, value)
                if value is not node:
                    rec.update(key_record(node))
            else:
                rec = value_record(node, _paths.keystr(keypath))
            leaves.append(Leaf(keypath, path, value, rec))
            return rec
        where = _paths.keystr(keypath)
        children, _ = flat
        out: Record = {"t": _node_type(node), "c": []}
        if out["t"] == "obj":
            out["cls"] = _cls_name(node)
        seen: dict[str, Any] = {}
        for key, child in children:
            kind, k = _paths.edge_of(key, where)
            name = _paths.name_of(kind, k)
            if name in seen:
                raise UnsupportedLeafError(
                    f"Two children of {where} map to the same name {name!r} ({seen[name]!r} and "
                    f"{k!r}). Fix: rename one of the keys."
                )
            seen[name] = k
            if len(name.encode("utf-8")) > MAX_NAME_BYTES:
                raise UnsupportedLeafError(
                    f"The key {str(k)[:40]!r}... at {where} becomes a file name of "
                    f"{len(name.encode('utf-8'))} bytes, but file systems take at most "
                    f"{MAX_NAME_BYTES}. Fix: shorten the key."
                )
            out["c"].append([kind, k, walk(child, (*keypath, key), (*names, name))])
        return out

    with gc_paused():
        return walk(tree, (), ()), leaves


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building a record of 10,000 leaves allocates enough
    to trigger collections, each of which also runs JAX's gc callback (~40% of a W2 plan).
    The records hold no reference cycles, so nothing is left for the collector to find."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def iter_leaves(node: Record, names: tuple[str, ...] = ()) -> Iterator[tuple[str, Record]]:
    """Yields ``(path, leaf_record)`` for every leaf of a structure record, in order."""
    out: list[tuple[str, Record]] = []
    _collect_leaves(node, "/".join(names), bool(names), out)
    return iter(out)


def _collect_leaves(node: Record, path: str, inner: bool, out: list[tuple[str, Record]]) -> None:
    """Appends the leaves under ``node`` (at ``path``; ``inner``: below the root) to ``out``:
    each node's path is joined once, not once per leaf under it."""
    if node["t"] in LEAF_KINDS:
        out.append((path, node))
        return
    name_of = _paths.name_of
    for kind, key, child in node["c"]:
        name = name_of(kind, key)
        _collect_leaves(child, f"{path}/{name}" if inner else name, True, out)


def rebuild(
    node: Record, leaf: Callable[[str, Record], Any], names: tuple[str, ...] = ()
) -> PyTree:
    """Rebuilds plain containers (dict, list, tuple, None) from a structure record."""
    t = node["t"]
    if t in LEAF_KINDS:
        return leaf("/".join(names), node)
    if t == "none":
        return None
    if _is_nnx_variable(node):  # its value alone: the pure dict nnx.update takes
        kind, k, child = node["c"][0]
        return rebuild(child, leaf, (*names, _paths.name_of(kind, k)))
    kids = [(k, rebuild(c, leaf, (*names, _paths.name_of(kind, k)))) for kind, k, c in node["c"]]
    if t == "list":
        return [v for _, v in kids]
    if t == "tuple":
        return tuple(v for _, v in kids)
    return {k: v for k, v in kids}


def _is_nnx_variable(node: Record) -> bool:
    """An NNX ``Variable`` (``Param``, ``BatchStat``, ``RngKey``...) saved as the object node
    holding its ``value``. Rebuilt as a dict it would be ``{"value": x}``, which ``nnx.update``
    takes for the value itself (NNX then reads it with ``v[...]``: ``KeyError: Ellipsis``)."""
    return (
        node["t"] == "obj"
        and node.get("cls", "").startswith("flax.nnx.")
        and len(node["c"]) == 1
        and node["c"][0][:2] == [_paths.ATTR, "value"]
    )


def root_attributes(tree_record: Record, extra: dict[str, Any]) -> dict[str, Any]:
    return {ATTR_KEY: {"format_version": FORMAT_VERSION, "tree": tree_record, **extra}}


def parse_root(doc: Any, where: str) -> dict[str, Any]:
    """The jaxckpt metadata of the root ``zarr.json`` (parsed) of the checkpoint ``where``."""
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    meta = attrs.get(ATTR_KEY) if isinstance(attrs, dict) else None
    version = meta.get("format_version", 0) if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("tree"), dict) or version is None:
        raise CorruptCheckpointError(
            f"{where}/zarr.json has no jaxckpt metadata; it is not a jaxckpt checkpoint or its "
            "metadata was damaged. Fix: point at a directory written by jaxckpt."
        )
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptCheckpointError(
            f"{where}/zarr.json gives the format version {version!r}, not a number: the "
            "checkpoint's metadata is damaged. Fix: restore an earlier checkpoint."
        )
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{where} was written in jaxckpt format version {version}, but this jaxckpt reads "
            f"versions up to {FORMAT_VERSION}. Fix: upgrade jaxckpt (pip install -U jaxckpt)."
        )
    return meta
