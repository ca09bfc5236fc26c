"""Reading one checkpoint: ``open`` (lazy), ``list_variables``, ``restore`` and ``match``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import _metadata, _storage
from ._errors import CheckpointNotFoundError

PyTree = Any
Index = tuple[slice | int, ...]


def _leaf_dtype(rec: dict[str, Any]) -> str:
    if rec["t"] == "array":
        return rec.get("key_dtype", rec["dtype"])
    if rec["t"] == "state":
        return "state"
    return rec["py"]


class Reader:
    """A lazy view of one checkpoint: nothing but the metadata is read until asked.

    ``reader.paths`` lists the leaves (``"params/l1/kernel"``); ``reader[path]`` reads one
    whole leaf, ``reader.read(path, index)`` a slice of it, ``reader.tree()`` everything.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = _storage.normalize(path)
        if not _storage.is_committed(self.path):
            raise _not_found(self.path)
        meta = _metadata.parse_root(_storage.read_json(self.path, "zarr.json").get("attributes", {}), self.path)
        self.metadata: dict[str, Any] = meta
        self.structure: dict[str, Any] = meta["tree"]
        self.records: dict[str, dict[str, Any]] = dict(_metadata.iter_leaves(self.structure))

    @property
    def paths(self) -> list[str]:
        return list(self.records)

    @property
    def step(self) -> int | None:
        return self.metadata.get("step")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.metadata.get("metrics", {})

    def __contains__(self, path: str) -> bool:
        return path in self.records

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, path: str) -> Any:
        return self.read(path)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def record(self, path: str) -> dict[str, Any]:
        try:
            return self.records[path]
        except KeyError:
            raise KeyError(
                f"{path!r} is not a leaf of the checkpoint {self.path}. Its leaves are listed by "
                "reader.paths (or `jaxckpt inspect`)."
            ) from None

    def variables(self) -> list[tuple[str, tuple[int, ...], str]]:
        out = []
        for p, rec in self.records.items():
            shape = tuple(rec.get("key_shape", rec["shape"])) if rec["t"] == "array" else ()
            out.append((p, shape, _leaf_dtype(rec)))
        return sorted(out)

    def read(self, path: str, index: Index | None = None) -> Any:
        """One leaf (an ``np.ndarray``, or the saved Python value), or a slice of it."""
        rec = self.record(path)
        if rec["t"] != "array":
            return self._value(rec)
        return self.read_many([(path, index)])[0]

    def read_many(self, requests: Sequence[tuple[str, Index | None]]) -> list[np.ndarray]:
        """Reads many array slices with all their I/O issued together."""
        recs = [self.record(p) for p, _ in requests]
        opened = {}
        for rec in recs:
            if rec["loc"] not in opened:
                opened[rec["loc"]] = _storage.open_array(self.path, rec["loc"], _array_meta(rec), create=False)
        futures = []
        for (p, index), rec in zip(requests, recs, strict=True):
            try:
                store = opened[rec["loc"]].result()
            except Exception as e:
                raise _storage.read_error(self.path, p, e) from e
            futures.append(store[index].read() if index is not None else store.read())
        out = []
        for (p, _), rec, f in zip(requests, recs, futures, strict=True):
            try:
                arr = f.result()
            except Exception as e:
                raise _storage.read_error(self.path, p, e) from e
            if rec.get("stored"):
                arr = arr.view(np.dtype(rec["dtype"]))
            out.append(arr)
        return out

    def _value(self, rec: dict[str, Any]) -> Any:
        return _metadata.load_value(rec) if rec["t"] == "value" else _metadata.load_state(rec)

    def tree(self, prefix: str | None = None) -> PyTree:
        """Every leaf (under ``prefix``), in dicts, lists and tuples of NumPy arrays.

        Typed PRNG key arrays come back as key arrays (``reader[path]`` gives their key data).
        """
        node = self.structure if not prefix else _metadata.subtree(self.structure, prefix)
        if node is None:
            raise KeyError(f"prefix {prefix!r} is not a path in the checkpoint {self.path}")
        base = prefix.strip("/") if prefix else ""
        leaves = dict(_metadata.iter_leaves(node))
        full = {p: (f"{base}/{p}" if base and p else (base or p)) for p in leaves}
        arrays = [p for p, r in leaves.items() if r["t"] == "array"]
        values = dict(zip(arrays, self.read_many([(full[p], None) for p in arrays]), strict=True))

        def leaf(path: str, rec: dict[str, Any]) -> Any:
            if rec["t"] != "array":
                return self._value(rec)
            arr = values[path]
            if "key" in rec:
                return _metadata.load_key(rec, arr)
            return arr[()] if rec.get("np_scalar") else arr

        return _metadata.rebuild(node, leaf)


def _array_meta(rec: dict[str, Any]) -> dict[str, Any]:
    """The zarr metadata of an array leaf, rebuilt from its record (no file read)."""
    return _storage.array_metadata(rec["shape"], rec.get("stored", rec["dtype"]), rec["chunks"])


def _not_found(path: str) -> CheckpointNotFoundError:
    if _storage.is_dir(path):
        return CheckpointNotFoundError(
            f"{path} holds no committed checkpoint (no {_storage.COMMIT} marker): it is an "
            "unfinished or interrupted save. Fix: restore an earlier checkpoint, e.g. "
            "jc.latest_checkpoint(directory)."
        )
    return CheckpointNotFoundError(
        f"No checkpoint at {path}. Fix: check the path; jc.latest_checkpoint(directory) finds "
        "the newest one in a manager's directory."
    )


def open(path: str | os.PathLike[str]) -> Reader:  # noqa: A001 - the public name is jc.open
    """Opens a checkpoint lazily; see :class:`Reader`."""
    return Reader(path)


def list_variables(path: str | os.PathLike[str]) -> list[tuple[str, tuple[int, ...], str]]:
    """``[(path, shape, dtype_name), ...]`` of every leaf, sorted by path; reads no array."""
    return Reader(path).variables()

