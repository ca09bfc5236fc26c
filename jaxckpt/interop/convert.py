"""``jc.convert`` and ``jaxckpt convert``: checkpoints of other JAX frameworks stay usable.

Reads a safetensors file or sharded set, a Flax msgpack file (``flax.serialization.to_bytes``),
an Orbax checkpoint directory or a jaxckpt checkpoint; writes a jaxckpt checkpoint, a Flax
msgpack file (DST ending in ``.msgpack``: ``flax.serialization.from_bytes(target, data)`` reads
it) or safetensors (DST ending in ``.safetensors``; sharded with an index beside it when
``max_shard_size`` is given and the tensors pass it).

Flax state dicts name a tuple's items ``"0"``, ``"1"``..., and Orbax keeps a named tuple's
fields: both are the edge names jaxckpt gives the same trees, so ``jc.restore(dst, target)``
with the original training state as target works on a converted checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxckpt import storage as _storage
from jaxckpt.checkpoint.reader import Reader
from jaxckpt.checkpoint.reader import open as open_checkpoint
from jaxckpt.checkpoint.save import save
from jaxckpt.errors import UnsupportedLeafError
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.interop import safetensors, safetensors_write

PyTree = Any
_KINDS = (
    "jaxckpt convert reads a safetensors file (or the index of a sharded set), a Flax msgpack "
    "file (flax.serialization.to_bytes), an Orbax checkpoint directory (one step, or one item of "
    "it), or a jaxckpt checkpoint"
)


def _kind(src: str) -> str:
    if safetensors.recognise(src):
        return "safetensors"
    if os.path.isfile(src):
        return "flax"
    if _storage.at(src).is_committed() and _storage.at(src).exists("zarr.json"):
        return "jaxckpt"
    names = set(os.listdir(src))
    if names & {"_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "commit_success.txt"}:
        return "orbax"
    steps = sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(src, n)))
    if steps:
        raise ValueError(
            f"{src} holds the steps {steps} of an Orbax CheckpointManager; convert one step at a "
            f"time. Fix: jaxckpt convert {os.path.join(src, str(steps[-1]))} DST"
        )
    raise ValueError(f"{src} is not a checkpoint that jaxckpt can read. {_KINDS}.")


def read_flax_msgpack(path: str) -> PyTree:
    """The state dict in a Flax msgpack file, with NumPy arrays as leaves."""
    from flax import serialization

    with open(path, "rb") as f:
        data = f.read()
    try:
        return serialization.msgpack_restore(data)
    except Exception as e:
        raise ValueError(
            f"{path} is not a Flax msgpack file ({type(e).__name__}: {e}). {_KINDS}."
        ) from e


def _orbax_item(path: str) -> PyTree:
    names = set(os.listdir(path))
    if "_METADATA" not in names and "manifest.ocdbt" not in names:
        files = [
            n for n in names if os.path.isfile(os.path.join(path, n)) and n != "commit_success.txt"
        ]
        if len(files) == 1:  # an orbax JsonSave item
            try:
                with open(os.path.join(path, files[0])) as f:
                    return json.load(f)
            except ValueError:
                pass
        raise ValueError(
            f"The Orbax item {path} is neither a PyTree nor a JSON item. Fix: convert a directory "
            "written by StandardSave / PyTreeSave / JsonSave."
        )
    return _orbax_pytree(path)


def _orbax_pytree(path: str) -> PyTree:
    """An Orbax PyTree item, read as NumPy arrays and Python scalars on any machine."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ValueError(
            f"{path} is an Orbax checkpoint; reading it needs orbax-checkpoint. Fix: pip install "
            "orbax-checkpoint"
        ) from e
    array, scalar = ocp.metadata.ArrayMetadata, ocp.metadata.ScalarMetadata
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax logs a warning for each metadata file it does not find
    try:
        ckptr = ocp.PyTreeCheckpointer()
        meta = ckptr.metadata(path)
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        args = jax.tree_util.tree_map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray if isinstance(m, array) else None),
            tree,
            is_leaf=lambda x: isinstance(x, (array, scalar)),
        )
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    finally:
        absl.setLevel(level)

    def plain(m: Any, x: Any) -> Any:
        if isinstance(m, scalar) and isinstance(x, (np.ndarray, np.generic)) and x.ndim == 0:
            return x.item()  # orbax saved a Python scalar
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree_util.tree_map(
        plain, tree, restored, is_leaf=lambda x: isinstance(x, (array, scalar))
    )


def read_orbax(path: str) -> tuple[PyTree, int | None, dict[str, Any]]:
    """``(tree, step, metrics)`` of an Orbax step directory or of one item directory."""
    names = set(os.listdir(path))
    meta: dict[str, Any] = {}
    if "_CHECKPOINT_METADATA" in names:
        try:
            with open(os.path.join(path, "_CHECKPOINT_METADATA")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = {}
    if "_METADATA" in names or "manifest.ocdbt" in names:
        tree = _orbax_item(path)
    else:
        items = sorted(n for n in names if os.path.isdir(os.path.join(path, n)))
        if not items:
            raise ValueError(f"The Orbax checkpoint {path} holds no items. {_KINDS}.")
        trees = {n: _orbax_item(os.path.join(path, n)) for n in items}
        tree = trees[items[0]] if items == ["default"] else trees
    name = os.path.basename(path)
    step = int(name) if name.isdigit() else None
    metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return tree, step, metrics


_NAMES = {
    "safetensors": "safetensors file",
    "flax": "Flax msgpack file",
    "orbax": "Orbax checkpoint",
    "jaxckpt": "jaxckpt checkpoint",
}


@dataclasses.dataclass
class _Item:
    """One leaf of the source: its keys, and how to read it when its turn comes."""

    keys: tuple[Any, ...]
    shape: tuple[int, ...]
    dtype: Any  # a NumPy dtype; None for a leaf that is not an array
    get: Callable[[], Any]
    what: str = "array"  # "array", "key" (typed PRNG key: get() gives its key data), "value"


def _key_of(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def _tree_items(tree: PyTree) -> list[_Item]:
    items = []
    for keypath, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(_key_of(k) for k in keypath)
        if _metadata.is_key(x):
            data = np.asarray(jax.random.key_data(x))
            items.append(_Item(keys, data.shape, data.dtype, _const(data), "key"))
        elif isinstance(x, (np.ndarray, np.generic, jax.Array)):
            items.append(_Item(keys, tuple(np.shape(x)), np.dtype(x.dtype), _const(x)))
        else:
            items.append(_Item(keys, (), None, _const(x), "value"))
    return items


def _checkpoint_items(reader: Reader) -> list[_Item]:
    """The leaves of a jaxckpt checkpoint, each read only when written."""
    items = []

    def walk(node: dict[str, Any], keys: tuple[Any, ...], names: tuple[str, ...]) -> None:
        if node["t"] not in _metadata.LEAF_KINDS:
            for kind, key, child in node.get("c", []):
                walk(child, (*keys, key), (*names, _paths.name_of(kind, key)))
            return
        path = "/".join(names)
        if node["t"] == "array":
            what = "key" if "key" in node else "array"
            shape, dtype = tuple(node["shape"]), np.dtype(node["dtype"])
            items.append(_Item(keys, shape, dtype, functools.partial(reader.read, path), what))
        else:
            items.append(
                _Item(keys, (), None, functools.partial(reader.__getitem__, path), "value")
            )

    walk(reader.structure, (), ())
    return items


def _const(x: Any) -> Callable[[], Any]:
    return lambda: x


def _as_array(get: Callable[[], Any]) -> np.ndarray:
    return np.asarray(get())


def _source_items(source: Any) -> list[_Item]:
    return [
        _Item(keys, leaf.shape, leaf.dtype, functools.partial(source.read, keys))
        for keys, leaf in source.leaves().items()
    ]


def _nested(items: list[_Item]) -> PyTree:
    """Nested dicts of the items' values (for a Flax state dict or a jaxckpt save)."""
    root: dict[Any, Any] = {}
    for it in items:
        node = root
        for k in it.keys[:-1]:
            node = node.setdefault(k, {})
        node[it.keys[-1] if it.keys else ""] = it.get()
    return root


def _where(keys: tuple[Any, ...]) -> str:
    return "".join(f"[{k!r}]" for k in keys) or "<root>"


def _tensors(items: list[_Item]) -> list[safetensors_write.Tensor]:
    """The items as safetensors tensors named by their keys joined with dots; a leaf the format
    cannot hold is refused, named by its key path."""
    out: list[safetensors_write.Tensor] = []
    seen: dict[str, str] = {}
    for it in items:
        where = _where(it.keys)
        parts = [str(k) for k in it.keys]
        if not parts or any(not p or "." in p for p in parts):
            raise UnsupportedLeafError(
                f"The leaf at {where} has a key that is empty or holds a '.', so it has no "
                "safetensors name (names join the keys with dots). Fix: rename the key, or "
                "convert to a jaxckpt checkpoint or a Flax msgpack file."
            )
        name = ".".join(parts)
        if it.what == "key":
            raise UnsupportedLeafError(
                f"The leaf at {where} is a typed PRNG key, which safetensors cannot hold. Fix: "
                "leave it out (e.g. convert the params subtree only), or store "
                "jax.random.key_data(key) in its place; a jaxckpt checkpoint keeps typed keys."
            )
        get, dtype, shape = it.get, it.dtype, it.shape
        if it.what == "value":
            value = it.get()
            if isinstance(value, (str, bytes)) or not isinstance(value, (bool, int, float)):
                raise UnsupportedLeafError(
                    f"The leaf at {where} is a Python {type(value).__name__}, which safetensors "
                    "cannot hold (it holds arrays only). Fix: leave it out, or convert to a "
                    "jaxckpt checkpoint or a Flax msgpack file."
                )
            arr = np.asarray(value)
            get, dtype, shape = _const(arr), arr.dtype, ()
        if safetensors_write.code_of(dtype) is None:
            raise UnsupportedLeafError(
                f"The leaf at {where} has the dtype {dtype}, which safetensors has no code for. "
                "Fix: cast it (e.g. to float32) before converting, or convert to a jaxckpt "
                "checkpoint."
            )
        if name in seen:
            raise UnsupportedLeafError(
                f"The leaves at {seen[name]} and {where} both get the safetensors name "
                f"{name!r}. Fix: rename one of the keys."
            )
        seen[name] = where
        out.append(
            safetensors_write.Tensor(
                name, tuple(shape), np.dtype(dtype), functools.partial(_as_array, get)
            )
        )
    return out


def write_flax_msgpack(tree: PyTree, dst: str) -> int:
    """Writes ``tree`` as ``flax.serialization.to_bytes`` would, atomically; returns how many
    typed PRNG keys were written as their key data (Flax's format has no key type)."""
    from flax import serialization

    keys = 0

    def plain(x: Any) -> Any:
        nonlocal keys
        if _metadata.is_key(x):
            keys += 1
            return np.asarray(jax.random.key_data(x))
        return x

    tree = jax.tree_util.tree_map(plain, tree)
    data = serialization.msgpack_serialize(serialization.to_state_dict(tree))
    parent, name = os.path.split(os.path.abspath(dst))
    _storage.at(parent).write_atomic(name, data)
    return keys


def _dst_kind(dst: str) -> str:
    if dst.endswith(".msgpack"):
        return "flax"
    return "safetensors" if dst.endswith(".safetensors") else "jaxckpt"


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    split: bool = True,
) -> str:
    """Converts the checkpoint ``src`` into ``dst``; returns the path to read it back from.

    Args:
        src: a safetensors file (or the index of a sharded set, or a directory holding
            ``model.safetensors``), a Flax msgpack file, an Orbax checkpoint directory or a
            jaxckpt checkpoint.
        dst: ending in ``.msgpack``: a Flax msgpack file; ending in ``.safetensors``: a
            safetensors file, names joined with dots; anything else: a jaxckpt checkpoint.
        max_shard_size: for safetensors: the most bytes in one file (``"5GB"``, ``"500MiB"``
            or an int). Tensors that pass it are written as shards
            ``model-00001-of-0000N.safetensors`` beside ``dst``, and the index
            ``model.safetensors.index.json`` (``dst`` + ``.index.json``) is returned.
        split: for a safetensors ``src``: split its names on ``"."`` into keys (False: keep
            each name whole).

    Raises:
        UnsupportedLeafError: a leaf the destination format cannot hold (a typed PRNG key or a
            str in safetensors), named by its key path.

    Example:
        >>> jc.convert("bert/model.safetensors", "/tmp/bert-ckpt")  # doctest: +SKIP
    """
    return _convert(os.fspath(src), os.fspath(dst), max_shard_size, split)[0]


def convert_summary(src: str, dst: str, max_shard_size: Any = None, split: bool = True) -> str:
    """As :func:`convert`; returns the one-line summary the CLI prints."""
    return _convert(src, dst, max_shard_size, split)[1]


def _convert(src: str, dst: str, max_shard_size: Any, split: bool) -> tuple[str, str]:
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.exists(src):
        raise FileNotFoundError(f"No file or directory {src}. Fix: check the path. {_KINDS}.")
    kind, to = _kind(src), _dst_kind(dst)
    most = None if max_shard_size is None else safetensors_write.parse_size(max_shard_size)
    if most is not None and to != "safetensors":
        raise ValueError(
            f"max_shard_size applies to safetensors, but {dst} is not a .safetensors file. "
            "Fix: give a DST ending in .safetensors, or leave max_shard_size out."
        )
    if to != "jaxckpt" and os.path.exists(dst):
        raise FileExistsError(
            f"{dst} already exists; convert never overwrites. Fix: delete it or choose another DST."
        )
    if kind == to:
        other = {
            "flax": "give a DST directory to make a jaxckpt checkpoint",
            "jaxckpt": "give a DST ending in .msgpack or .safetensors to export it",
            "safetensors": "give a DST directory to make a jaxckpt checkpoint",
        }[kind]
        raise ValueError(f"{src} is already a {_NAMES[kind]}. Fix: {other}.")
    step: int | None = None
    metrics: dict[str, Any] = {}
    source = reader = tree = None
    if kind == "jaxckpt":
        reader = open_checkpoint(src)
        items = _checkpoint_items(reader)
    elif kind == "safetensors":
        source = safetensors.open(src, split=split)
        items = _source_items(source)
    else:
        tree, step, metrics = (
            read_orbax(src) if kind == "orbax" else (read_flax_msgpack(src), None, {})
        )
        items = _tree_items(tree)
    try:
        head = f"Converted the {_NAMES[kind]} {src} ({len(items)} leaves)"
        if to == "safetensors":
            written = safetensors_write.write(dst, _tensors(items), most)
            if written != dst:
                return written, f"{head} to safetensors shards indexed by {written}"
            return dst, f"{head} to the safetensors file {dst}"
        if tree is None:  # read whole: a Flax state dict or a jaxckpt save takes a tree
            tree = reader.tree() if reader is not None else _nested(items)
        if to == "flax":
            keys = write_flax_msgpack(tree, dst)
            note = f"; {keys} typed PRNG keys written as their key data" if keys else ""
            return dst, f"{head} to the Flax msgpack file {dst}{note}"
        save(dst, tree, step=step, metrics=metrics or None)
        return dst, f"{head} to the jaxckpt checkpoint {dst}"
    finally:
        if source is not None:
            source.close()
