"""Flax msgpack files: ``flax.serialization.to_bytes`` / ``msgpack_serialize`` output.

The file is one msgpack map (a state dict: a list's items are named ``"0"``, ``"1"``...), its
arrays msgpack extension values; arrays over Flax's chunk size are kept as
``{"__msgpack_chunked_array__": ..., "chunks": ..., "shape": ...}`` maps. Flax's own
``msgpack_restore`` decodes both, so the file is read with it, once, whole: the format has no
index to read one array by. On ``s3://``/``gs://`` its bytes are read through the storage layer
(TensorStore's kvstore), as every other object there.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxckpt import storage as _storage
from jaxckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from jaxckpt.interop.source import Index, Keys, Leaf

# A msgpack map's first byte: fixmap (0x80-0x8f), map16 (0xde), map32 (0xdf). A pickle starts
# with 0x80 too (its PROTO opcode, then the protocol number 2-5): an empty fixmap is only a
# whole file of that one byte.
_MAP_START = frozenset([*range(0x81, 0x90), 0xDE, 0xDF])


def _split_url(path: str) -> tuple[str, str]:
    parent, name = path.rstrip("/").rsplit("/", 1)
    return parent + "/", name


def _no_files(path: str) -> bool:
    """Whether ``path`` is on a store without files (an object store)."""
    return _storage.at(path).os_path() is None


def recognise(path: str) -> bool:
    """A file (local, or an object on ``s3://``/``gs://``) that starts as a msgpack map does
    (and is no pickle)."""
    if _no_files(path):
        parent, name = _split_url(path)
        try:  # two bytes, not the file: a URL that is no file costs one small request
            head = _storage.at(parent).read_range(name, 0, 2) or b""
        except Exception:  # noqa: BLE001 - unreachable
            return False
    else:
        try:
            with builtins.open(path, "rb", buffering=0) as f:
                head = f.read(2)
        except OSError:  # a directory, nothing there
            return False
    return head == b"\x80" or (len(head) == 2 and head[0] in _MAP_START and head != b"\x80\x02")


def _read(path: str) -> bytes:
    """The whole file: the format has no index to read one array by."""
    if _no_files(path):
        parent, name = _split_url(path)
        data = _storage.at(parent).read(name)
        if data is None:
            raise CheckpointNotFoundError(f"No Flax msgpack file at {path}. Fix: check the path.")
        return data
    with builtins.open(path, "rb", buffering=0) as f:
        return f.read()


def _walk(node: Any, keys: Keys, out: dict[Keys, Leaf], nodes: dict[Keys, str]) -> None:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _walk(v, (*keys, k if isinstance(k, str) else str(k)), out, nodes)
    elif isinstance(node, (list, tuple)) and node:
        for i, v in enumerate(node):
            _walk(v, (*keys, i), out, nodes)
    elif isinstance(node, np.ndarray):
        out[keys] = Leaf(node.shape, node.dtype, value=node)
    elif isinstance(node, np.generic):
        out[keys] = Leaf((), node.dtype, value=node)
    elif node is None or isinstance(node, (dict, list, tuple)):
        if keys:  # kept in the tree, holding no leaf
            nodes[keys] = "none" if node is None else "dict" if isinstance(node, dict) else "list"
    else:
        out[keys] = Leaf((), np.dtype(object), value=node)


class FlaxMsgpackSource:
    """A Flax msgpack file, as a :class:`~jaxckpt.interop.source.Source`."""

    format = "flax-msgpack"
    step = None

    def __init__(self, path: str):
        from flax import serialization

        self.path = path
        data = _read(path)
        try:
            tree = serialization.msgpack_restore(data)
        except Exception as e:
            raise CorruptCheckpointError(
                f"{path} starts as a Flax msgpack file but cannot be decoded ({type(e).__name__}: "
                f"{e}): it is truncated or damaged. Fix: write it again "
                "(flax.serialization.to_bytes), or copy it again in full."
            ) from e
        self._leaves: dict[Keys, Leaf] = {}
        self._nodes: dict[Keys, str] = {}
        _walk(tree, (), self._leaves, self._nodes)

    def leaves(self) -> Mapping[Keys, Leaf]:
        return self._leaves

    def nodes(self) -> Mapping[Keys, str]:
        """None and empty containers (an empty list is an empty dict in Flax's state dict)."""
        return self._nodes

    def read(self, keys: Keys, index: Index | None = None) -> np.ndarray:
        arr = np.asarray(self._leaves[keys].value)
        return arr if index is None else arr[index]

    def close(self) -> None:
        self._leaves = {}


def open(path: str) -> FlaxMsgpackSource:  # noqa: A001 - every reader module names it open
    return FlaxMsgpackSource(os.fspath(path))
