"""``jc.convert`` and ``jaxckpt convert``: checkpoints of other JAX frameworks stay usable.

Reads a safetensors file or sharded set, a Flax msgpack file (``flax.serialization.to_bytes``),
an Orbax checkpoint directory or a jaxckpt checkpoint; writes a jaxckpt checkpoint, a Flax
msgpack file (DST ending in ``.msgpack``: ``flax.serialization.from_bytes(target, data)`` reads
it) or safetensors (DST ending in ``.safetensors``; sharded with an index beside it when
``max_shard_size`` is given and the tensors pass it).

Flax state dicts name a tuple's items ``"0"``, ``"1"``..., and Orbax keeps a named tuple's
fields: both are the edge names jaxckpt gives the same trees, so ``jc.restore(dst, target)``
with the original training state as target works on a converted checkpoint.

Reading the source is :mod:`jaxckpt.interop.convert_sources`; this module writes each kind of
destination.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxckpt import storage as _storage
from jaxckpt.checkpoint.save import save
from jaxckpt.errors import UnsupportedLeafError
from jaxckpt.format import metadata as _metadata
from jaxckpt.interop import safetensors_write
from jaxckpt.interop.convert_sources import KINDS, NAMES, Item, const, kind_of, open_source

PyTree = Any


def _as_array(get: Callable[[], Any]) -> np.ndarray:
    return np.asarray(get())


def _where(keys: tuple[Any, ...]) -> str:
    return "".join(f"[{k!r}]" for k in keys) or "<root>"


def _tensors(items: list[Item]) -> list[safetensors_write.Tensor]:
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
            get, dtype, shape = const(arr), arr.dtype, ()
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
    kind, to, most = _check(src, dst, max_shard_size)
    opened = open_source(kind, src, split)
    try:
        head = f"Converted the {NAMES[kind]} {src} ({len(opened.items)} leaves)"
        if to == "safetensors":
            written = safetensors_write.write(dst, _tensors(opened.items), most)
            if written != dst:
                return written, f"{head} to safetensors shards indexed by {written}"
            return dst, f"{head} to the safetensors file {dst}"
        tree = opened.whole_tree()
        if to == "flax":
            keys = write_flax_msgpack(tree, dst)
            note = f"; {keys} typed PRNG keys written as their key data" if keys else ""
            return dst, f"{head} to the Flax msgpack file {dst}{note}"
        save(dst, tree, step=opened.step, metrics=opened.metrics or None)
        return dst, f"{head} to the jaxckpt checkpoint {dst}"
    finally:
        opened.close()


def _check(src: str, dst: str, max_shard_size: Any) -> tuple[str, str, int | None]:
    """``(kind of src, kind of dst, max shard bytes)``, or an error saying why they do not
    convert."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"No file or directory {src}. Fix: check the path. {KINDS}.")
    kind, to = kind_of(src), _dst_kind(dst)
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
        raise ValueError(f"{src} is already a {NAMES[kind]}. Fix: {other}.")
    return kind, to, most
