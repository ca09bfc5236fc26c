"""Reading safetensors files: one file, or a sharded set through its ``*.safetensors.index.json``.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets`` (relative to the end of the header), then the tensors' bytes.
The header is read once; a tensor, or rows of one, is then read with one positioned read of
exactly its bytes (``os.preadv`` into the array's own buffer, so nothing is copied). That is why
this module reads the bytes itself rather than through ``safetensors.safe_open``: the library
has no way to read only the rows a process needs on object stores, and on ``s3://``/``gs://``
the same byte ranges are read through TensorStore's kvstore.

Names are split on ``"."`` into dict keys (``bert.encoder.layer.0.attention.self.query.kernel``
becomes ``("bert", "encoder", "layer", "0", ...)``), so a Flax tree of the same model matches;
every key is a ``str``, digits included (``"0"`` matches a list index of the target, whose
jaxckpt path is ``0`` too). ``split=False`` keeps each name whole as one key.

The header is parsed in :mod:`jaxckpt.interop.safetensors_header`, the bytes read in
:mod:`jaxckpt.interop.safetensors_ranges`; this module opens a file, a sharded set or a model
directory as a source.
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxckpt import memory as _memory
from jaxckpt.errors import CheckpointNotFoundError, StructureMismatchError
from jaxckpt.interop.safetensors_header import INDEX_SUFFIX, corrupt, looks_like, read_header
from jaxckpt.interop.safetensors_ranges import MIN_RUN as MIN_RUN
from jaxckpt.interop.safetensors_ranges import File, Tensor, no_files, read_box
from jaxckpt.interop.source import Index, Keys, Leaf

FORMAT = "safetensors"


def recognise(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file, an index of shards, or a directory holding
    ``model.safetensors`` or an index; judged by content (the header), not by name alone."""
    path = os.fspath(path)
    if no_files(path):
        if not path.endswith((".safetensors", INDEX_SUFFIX)):
            return False
        try:
            head = File(path).read(0, 9)
        except Exception:  # noqa: BLE001 - unreachable or absent: not recognised
            return False
        return looks_like(head, path)
    if os.path.isdir(path):
        return _main_file(path) is not None
    if not os.path.isfile(path):
        return False
    try:
        with builtins.open(path, "rb", buffering=0) as f:
            head = f.read(9)
    except OSError:
        return False
    return looks_like(head, path)


def _main_file(directory: str) -> str | None:
    """The index (preferred) or ``model.safetensors`` in a directory, as Hugging Face lays
    out a model; None if neither is there."""
    names = set(os.listdir(directory))
    indexes = sorted(n for n in names if n.endswith(INDEX_SUFFIX))
    if "model" + INDEX_SUFFIX in names:
        return os.path.join(directory, "model" + INDEX_SUFFIX)
    if len(indexes) == 1:
        return os.path.join(directory, indexes[0])
    if "model.safetensors" in names:
        return os.path.join(directory, "model.safetensors")
    return None


def open(path: str | os.PathLike[str], *, split: bool = True) -> SafetensorsSource:  # noqa: A001
    """Opens a safetensors file, a sharded set (its index) or a model directory for reading."""
    return SafetensorsSource(os.fspath(path), split=split)


class SafetensorsSource:
    """A safetensors file or sharded set, opened: its leaves, read on demand."""

    format = FORMAT
    step = None

    def __init__(self, path: str, *, split: bool = True):
        self.path = path
        if not no_files(path) and os.path.isdir(path):
            main = _main_file(path)
            if main is None:
                raise CheckpointNotFoundError(
                    f"The directory {path} holds neither model.safetensors nor a "
                    f"*{INDEX_SUFFIX}. Fix: give the path of a .safetensors file or of the index."
                )
            path = main
        self.files: list[File] = []
        self.metadata: dict[str, Any] = {}
        try:
            named = self._index(path) if path.endswith(INDEX_SUFFIX) else self._file(path)
        except BaseException:
            self.close()
            raise
        self._leaves: dict[Keys, Leaf] = {}
        self._tensors: dict[Keys, Tensor] = {}
        for name, t in named:
            keys = _split(name, path) if split else (name,)
            self._tensors[keys] = t
            self._leaves[keys] = Leaf(t.shape, t.dtype)
        if split:
            _check_tree(list(self._tensors), path)

    def _file(self, path: str) -> list[tuple[str, Tensor]]:
        file = File(path)
        self.files.append(file)
        self.metadata, tensors = read_header(file)
        return tensors

    def _index(self, path: str) -> list[tuple[str, Tensor]]:
        file = File(path)
        try:
            raw = file.read_all()
        finally:
            file.close()
        try:
            index = json.loads(raw)
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise corrupt(path, 'its index is not JSON with a "weight_map"') from None
        self.metadata = dict(index.get("metadata") or {})
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        shards: dict[str, dict[str, Tensor]] = {}
        for name in weight_map.values():
            if name not in shards:
                f = File(f"{folder}/{name}")
                self.files.append(f)
                shards[name] = dict(read_header(f)[1])
        out = []
        for name in sorted(weight_map, key=lambda k: (list(shards).index(weight_map[k]), k)):
            tensor = shards[weight_map[name]].get(name)
            if tensor is None:
                raise corrupt(
                    f"{folder}/{weight_map[name]}",
                    f"the tensor {name!r} its index {path} names is not in it",
                )
            out.append((name, tensor))
        return out

    def leaves(self) -> Mapping[Keys, Leaf]:
        return self._leaves

    def read(self, keys: Keys, index: Index | None = None) -> np.ndarray:
        t = self._tensors[tuple(keys)]
        if index is None or not t.shape or not index:
            return t.file.read_into(_memory.aligned_empty(t.shape, t.dtype), t.start)
        return read_box(t, index)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split(name: str, where: str) -> Keys:
    keys = tuple(name.split("."))
    if "" in keys:
        raise StructureMismatchError(
            f"The tensor name {name!r} in {where} has an empty part between dots, so it does "
            "not split into a tree path. Fix: open it with split=False to keep names whole."
        )
    return keys


def _check_tree(paths: list[Keys], where: str) -> None:
    """Names split on dots form a tree: no name is also the start of another."""
    ordered = sorted(paths)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b[: len(a)] == a:
            raise StructureMismatchError(
                f"The tensor {'.'.join(map(str, a))!r} in {where} is also the start of "
                f"{'.'.join(map(str, b))!r}, so split on dots they do not form a tree. Fix: open it "
                "with split=False to keep names whole."
            )
