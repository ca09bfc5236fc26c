"""``jaxckpt convert``: checkpoints of other JAX frameworks stay usable.

Reads a Flax msgpack file (``flax.serialization.to_bytes``) or an Orbax checkpoint directory
and saves its tree as a jaxckpt checkpoint; writes a jaxckpt checkpoint as a Flax msgpack file
(``flax.serialization.from_bytes(target, data)`` reads it) when DST ends in ``.msgpack``.

Flax state dicts name a tuple's items ``"0"``, ``"1"``..., and Orbax keeps a named tuple's
fields: both are the edge names jaxckpt gives the same trees, so ``jc.restore(dst, target)``
with the original training state as target works on a converted checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from . import storage as _storage
from ._checkpoint import save
from ._reader import open as open_checkpoint

PyTree = Any
_KINDS = (
    "jaxckpt convert reads a Flax msgpack file (flax.serialization.to_bytes), an Orbax "
    "checkpoint directory (one step, or one item of it), or a jaxckpt checkpoint"
)


def _kind(src: str) -> str:
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


def write_flax_msgpack(tree: PyTree, dst: str) -> None:
    """Writes ``tree`` as ``flax.serialization.to_bytes`` would, atomically."""
    from flax import serialization

    data = serialization.msgpack_serialize(serialization.to_state_dict(tree))
    parent, name = os.path.split(os.path.abspath(dst))
    _storage.at(parent).write_atomic(name, data)


def convert(src: str, dst: str) -> str:
    """Converts the checkpoint ``src`` into ``dst``; returns a one-line summary.

    ``dst`` ending in ``.msgpack`` is written as a Flax msgpack file, anything else as a
    jaxckpt checkpoint directory.
    """
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.exists(src):
        raise FileNotFoundError(f"No file or directory {src}. Fix: check the path. {_KINDS}.")
    kind = _kind(src)
    to_flax = dst.endswith(".msgpack")
    if to_flax and os.path.exists(dst):
        raise FileExistsError(
            f"{dst} already exists; convert never overwrites. Fix: delete it or choose another DST."
        )
    if kind == "flax" and to_flax:
        raise ValueError(
            f"{src} is already a Flax msgpack file. Fix: give a DST directory to make a jaxckpt checkpoint."
        )
    if kind == "jaxckpt" and not to_flax:
        raise ValueError(
            f"{src} is already a jaxckpt checkpoint. Fix: give a DST ending in .msgpack to "
            "export it as a Flax msgpack file."
        )
    step: int | None = None
    metrics: dict[str, Any] = {}
    if kind == "jaxckpt":
        tree = open_checkpoint(src).tree()
    elif kind == "flax":
        tree = read_flax_msgpack(src)
    else:
        tree, step, metrics = read_orbax(src)
    n = len(jax.tree_util.tree_leaves(tree))
    names = {
        "flax": "Flax msgpack file",
        "orbax": "Orbax checkpoint",
        "jaxckpt": "jaxckpt checkpoint",
    }
    if to_flax:
        write_flax_msgpack(tree, dst)
        return f"Converted the {names[kind]} {src} ({n} leaves) to the Flax msgpack file {dst}"
    save(dst, tree, step=step, metrics=metrics or None)
    return f"Converted the {names[kind]} {src} ({n} leaves) to the jaxckpt checkpoint {dst}"
