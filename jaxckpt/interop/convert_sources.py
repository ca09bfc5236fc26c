"""What :func:`jaxckpt.convert` reads: the kind of a source (safetensors, Flax msgpack,
Orbax, jaxckpt), read into :class:`Item` s, one per leaf, each read only when its turn comes
where the format allows (safetensors and jaxckpt; Flax msgpack and Orbax are read whole)."""

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
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format.metadata import Record
from jaxckpt.interop import safetensors

PyTree = Any
KINDS = (
    "jaxckpt convert reads a safetensors file (or the index of a sharded set), a Flax msgpack "
    "file (flax.serialization.to_bytes), an Orbax checkpoint directory (one step, or one item of "
    "it), or a jaxckpt checkpoint"
)
NAMES = {
    "safetensors": "safetensors file",
    "flax": "Flax msgpack file",
    "orbax": "Orbax checkpoint",
    "jaxckpt": "jaxckpt checkpoint",
}


def kind_of(src: str) -> str:
    """Which of :data:`NAMES` the path ``src`` is, by content."""
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
    raise ValueError(f"{src} is not a checkpoint that jaxckpt can read. {KINDS}.")


@dataclasses.dataclass
class Item:
    """One leaf of the source: its keys, and how to read it when its turn comes."""

    keys: tuple[Any, ...]
    shape: tuple[int, ...]
    dtype: Any  # a NumPy dtype; None for a leaf that is not an array
    get: Callable[[], Any]
    what: str = "array"  # "array", "key" (typed PRNG key: get() gives its key data), "value"


@dataclasses.dataclass
class Opened:
    """A source opened for converting: its items, and what else its kind gives."""

    items: list[Item]
    tree: PyTree = None  # the whole tree, where the source was read whole (Flax, Orbax)
    reader: Reader | None = None  # a jaxckpt checkpoint's
    source: Any = None  # a safetensors source, closed by close()
    step: int | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def whole_tree(self) -> PyTree:
        """The tree read whole: a Flax state dict or a jaxckpt save takes a tree."""
        if self.tree is not None:
            return self.tree
        return self.reader.tree() if self.reader is not None else nested(self.items)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def open_source(kind: str, src: str, split: bool) -> Opened:
    """The source ``src`` of the kind ``kind`` (:func:`kind_of`), opened."""
    if kind == "jaxckpt":
        reader = open_checkpoint(src)
        return Opened(_checkpoint_items(reader), reader=reader)
    if kind == "safetensors":
        source = safetensors.open(src, split=split)
        return Opened(_source_items(source), source=source)
    tree, step, metrics = read_orbax(src) if kind == "orbax" else (read_flax_msgpack(src), None, {})
    return Opened(_tree_items(tree), tree=tree, step=step, metrics=metrics)


def read_flax_msgpack(path: str) -> PyTree:
    """The state dict in a Flax msgpack file, with NumPy arrays as leaves."""
    from flax import serialization

    with open(path, "rb") as f:
        data = f.read()
    try:
        return serialization.msgpack_restore(data)
    except Exception as e:
        raise ValueError(
            f"{path} is not a Flax msgpack file ({type(e).__name__}: {e}). {KINDS}."
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
            raise ValueError(f"The Orbax checkpoint {path} holds no items. {KINDS}.")
        trees = {n: _orbax_item(os.path.join(path, n)) for n in items}
        tree = trees[items[0]] if items == ["default"] else trees
    name = os.path.basename(path)
    step = int(name) if name.isdigit() else None
    metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return tree, step, metrics


def _key_of(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def _tree_items(tree: PyTree) -> list[Item]:
    items = []
    for keypath, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(_key_of(k) for k in keypath)
        if _metadata.is_key(x):
            data = np.asarray(jax.random.key_data(x))
            items.append(Item(keys, data.shape, data.dtype, const(data), "key"))
        elif isinstance(x, (np.ndarray, np.generic, jax.Array)):
            items.append(Item(keys, tuple(np.shape(x)), np.dtype(x.dtype), const(x)))
        else:
            items.append(Item(keys, (), None, const(x), "value"))
    return items


def _checkpoint_items(reader: Reader) -> list[Item]:
    """The leaves of a jaxckpt checkpoint, each read only when written."""
    items = []

    def walk(node: Record, keys: tuple[Any, ...], names: tuple[str, ...]) -> None:
        if node["t"] not in _metadata.LEAF_KINDS:
            for kind, key, child in node.get("c", []):
                walk(child, (*keys, key), (*names, _paths.name_of(kind, key)))
            return
        path = "/".join(names)
        if node["t"] == "array":
            what = "key" if "key" in node else "array"
            shape, dtype = tuple(node["shape"]), np.dtype(node["dtype"])
            items.append(Item(keys, shape, dtype, functools.partial(reader.read, path), what))
        else:
            items.append(Item(keys, (), None, functools.partial(reader.__getitem__, path), "value"))

    walk(reader.structure, (), ())
    return items


def const(x: Any) -> Callable[[], Any]:
    return lambda: x


def _source_items(source: Any) -> list[Item]:
    return [
        Item(keys, leaf.shape, leaf.dtype, functools.partial(source.read, keys))
        for keys, leaf in source.leaves().items()
    ]


def nested(items: list[Item]) -> PyTree:
    """Nested dicts of the items' values (for a Flax state dict or a jaxckpt save)."""
    root: dict[Any, Any] = {}
    for it in items:
        node = root
        for k in it.keys[:-1]:
            node = node.setdefault(k, {})
        node[it.keys[-1] if it.keys else ""] = it.get()
    return root
