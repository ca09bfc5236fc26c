"""One checkpoint opened: ``open`` (lazy), ``list_variables``, and the :class:`Reader`'s lookup
of records and metadata (the reading of array data is in :mod:`read_chunks`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint.read_chunks import ChunkReading, Index
from jaxckpt.checkpoint.read_chunks import _checked_index as _checked_index  # interop.foreign
from jaxckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from jaxckpt.format import commit as _commit
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format import run as _run
from jaxckpt.format import split as _split
from jaxckpt.format import validate as _validate
from jaxckpt.format.metadata import Record
from jaxckpt.storage import confine as _confine

PyTree = Any


def _leaf_dtype(rec: Record) -> str:
    if rec["t"] == "array":
        return rec.get("key_dtype", rec["dtype"])
    if rec["t"] == "state":
        return "state"
    return rec["py"]


class LeafMapping:
    """What every reader (of a jaxckpt checkpoint, or of another format's) offers on top of
    its ``records``, ``metadata``, ``find``, ``read`` and ``close``: the leaves as a mapping
    of paths, the step and metrics, and ``with``."""

    records: Any
    metadata: dict[str, Any]

    def find(self, path: str) -> Record | None:
        raise NotImplementedError  # each reader's own

    def read(self, path: str, index: Any = None) -> Any:
        raise NotImplementedError  # each reader's own

    def close(self) -> None:
        raise NotImplementedError  # each reader's own

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
        return self.find(path) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, path: str) -> Any:
        return self.read(path)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reader(LeafMapping, ChunkReading):
    """A lazy view of one checkpoint: nothing but the metadata is read until asked (of a big
    tree's split metadata, only the root's and the group files on the paths looked up).

    ``reader.paths`` lists the leaves (``"params/l1/kernel"``); ``reader[path]`` reads one
    whole leaf, ``reader.read(path, index)`` a slice of it, ``reader.tree()`` everything.
    """

    def __init__(self, path: str | os.PathLike[str], prefetch: Sequence[str] = ()):
        """``prefetch``: node paths (``"a/b"``) whose group files are read beside the root's, in
        case the record is split there (a partial restore names the paths it will look up)."""
        self.path = _storage.normalize(path)
        self._store = _storage.at(self.path)
        self._files = self._store.os_path()  # None: no files to read directly (TensorStore)
        io = _runtime.pool("read")
        commit = io.submit(self._store.read, _storage.COMMIT)  # all at once
        early = {f"{p}/zarr.json": io.submit(self._store.read, f"{p}/zarr.json") for p in prefetch}
        try:
            root: Any = self._store.read("zarr.json")
        except (OSError, CheckpointError) as e:
            root = e
        marker = commit.result()
        if marker is None:
            raise _not_found(self.path)
        if isinstance(root, Exception):
            raise root
        # Every metadata file read is checked against the checksum COMMIT holds for it.
        self.commit = _commit.Commit(self.path, marker)
        self.commit.check("zarr.json", root)
        if root is None:  # a version 2 checkpoint (no checksums) without its root zarr.json
            raise CorruptCheckpointError(
                f"{self.path}/zarr.json is missing: the checkpoint's metadata is damaged. Fix: "
                "restore an earlier checkpoint, or copy this checkpoint again in full."
            )
        meta = _metadata.parse_root(_storage.parse_json(f"{self.path}/zarr.json", root), self.path)
        self.commit.require(meta["format_version"])
        self.metadata: dict[str, Any] = meta
        self._tree = _split.Tree(self.path, meta["tree"], early, self.commit.check)
        self._records: dict[str, Record] | None = None
        self._present: set[str] = set()  # arrays whose unlisted chunks were found on disk

    @property
    def structure(self) -> Record:
        """The whole structure record, every split subtree read in (see docs/format.md)."""
        return self._tree.whole()  # type: ignore[return-value]  # the root always exists

    @property
    def records(self) -> dict[str, Record]:
        """``{path: leaf record}`` of every leaf, in flatten order."""
        if self._records is None:
            leaves = _metadata.iter_leaves(self.structure)
            self._records = {p: self._checked(p, rec) for p, rec in leaves}
        return self._records

    @functools.cached_property
    def _valid(self) -> set[int]:
        """The ids of the leaf records checked (each is checked once, when first handed out)."""
        return set()

    def _checked(self, path: str, rec: Record) -> Record:
        """``rec``, once it passed :func:`jaxckpt.format.validate.leaf_problem`: every record a
        reader hands out does, before anything uses it."""
        if id(rec) not in self._valid:
            problem = _validate.leaf_problem(rec)
            if problem is not None:
                raise _confine.error(self.path, path, self.keystr(path), problem)
            self._valid.add(id(rec))
        return rec

    def _error(self, path: str, e: Exception) -> Exception:
        """The error a failed read of the leaf at ``path`` raises."""
        if isinstance(e, _confine.Violation):
            return _confine.error(self.path, path, self.keystr(path), str(e))
        return _storage.read_error(self.path, path, e)

    def close(self) -> None:
        """Nothing to release: a checkpoint's files are opened per read."""

    def metadata_file(self, key: str) -> Any:
        """The JSON file ``key`` of the checkpoint (``"params/w/zarr.json"``), parsed once its
        bytes match the checksum ``COMMIT`` holds for them (version 2: no check)."""
        data = self._store.read(key)
        self.commit.check(key, data)
        if data is None:
            raise CorruptCheckpointError(
                f"{_storage.join(self.path, key)} is missing: the checkpoint's metadata is "
                "damaged. Fix: restore an earlier checkpoint, or copy this checkpoint again."
            )
        return _storage.parse_json(_storage.join(self.path, key), data)

    def resolve(self, path: str) -> str:
        """The saved path a looked-up ``path`` stands for: itself (a foreign checkpoint's
        reader may find it under another name, see jaxckpt.interop.foreign)."""
        return path

    def find(self, path: str) -> Record | None:
        """The record of the leaf at ``path``, or None; reads only the metadata on its path."""
        if self._records is not None:
            return self._records.get(path)
        node = self._tree.node(path) if isinstance(path, str) else None
        if node is None or node["t"] not in _metadata.LEAF_KINDS:
            return None
        return self._checked(path, node)

    def node(self, path: str) -> Record | None:
        """The structure record at ``path`` (a leaf or an inner node), or None."""
        return self._tree.node("/".join(p for p in path.split("/") if p))

    def leaves(self, prefix: str = "") -> dict[str, Record]:
        """``{path: leaf record}`` of the leaves under ``prefix`` (a path, or "" for all)."""
        if not prefix:
            return self.records
        node = self._tree.whole(prefix)
        if node is None:
            return {}
        return {p: self._checked(p, r) for p, r in _metadata.iter_leaves(node, (prefix,))}

    def keystr(self, path: str) -> str:
        """The key path users see (``['params']['l1']``) of a saved ``path``."""
        es = self._tree.entries(path)
        if es is None:
            return path
        return _paths.keystr([_paths.key_of(kind, key) for kind, key, _ in es])

    def record(self, path: str) -> Record:
        rec = self.find(path)
        if rec is None:
            raise KeyError(
                f"{path!r} is not a leaf of the checkpoint {self.path}. Its leaves are listed by "
                "reader.paths (or `jaxckpt inspect`)."
            )
        return rec

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

    def _value(self, rec: Record) -> Any:
        return _metadata.load_value(rec) if rec["t"] == "value" else _metadata.load_state(rec)

    def tree(self, prefix: str | None = None) -> PyTree:
        """Every leaf (under ``prefix``), in dicts, lists and tuples of NumPy arrays.

        Typed PRNG key arrays come back as key arrays (``reader[path]`` gives their key data).
        """
        base = "/".join(p for p in (prefix or "").split("/") if p)
        node = self._tree.whole(base)
        if node is None:
            raise KeyError(f"prefix {prefix!r} is not a path in the checkpoint {self.path}")
        leaves = self.leaves(base)
        arrays = [p for p, r in leaves.items() if r["t"] == "array"]
        values = dict(zip(arrays, self.read_many([(p, None) for p in arrays]), strict=True))

        def leaf(path: str, rec: Record) -> Any:
            if rec["t"] != "array":
                return self._value(rec)
            arr = values[f"{base}/{path}" if base and path else (base or path)]
            if "key" in rec:
                return _metadata.load_key(rec, arr)
            return arr[()] if rec.get("np_scalar") else arr

        return _metadata.rebuild(node, leaf)


def _not_found(path: str) -> CheckpointNotFoundError:
    steps = _run.committed_steps(path)
    if steps or _storage.at(path).exists(_run.INDEX):  # a manager's directory
        fix = (
            f"restore one of them: jc.restore(jc.latest_checkpoint({path!r}), ...) for the "
            f"newest, or jc.CheckpointManager({path!r}).restore(step, target)."
            if steps
            else "check the path, or save a checkpoint there first (CheckpointManager.save)."
        )
        held = (
            f"{len(steps)} checkpoints, the newest {_run.step_name(steps[-1])}"
            if steps
            else "no checkpoint yet"
        )
        return CheckpointNotFoundError(
            f"{path} is a CheckpointManager's directory ({held}), not one checkpoint. Fix: {fix}"
        )
    if _storage.at(path).is_dir():
        return CheckpointNotFoundError(
            f"{path} holds no committed checkpoint (no {_storage.COMMIT} marker): it is an "
            "unfinished or interrupted save. Fix: restore an earlier checkpoint, e.g. "
            "jc.latest_checkpoint(directory)."
        )
    return CheckpointNotFoundError(
        f"No checkpoint at {path}. Fix: check the path; jc.latest_checkpoint(directory) finds "
        "the newest one in a manager's directory."
    )


def open_reader(path: str | os.PathLike[str], prefetch: Sequence[str] = ()) -> Reader:
    """The reader of the checkpoint at ``path``: a jaxckpt checkpoint, or a foreign one (Orbax,
    Flax msgpack, safetensors) recognised by its content and read through the same interface
    (:class:`jaxckpt.interop.foreign.ForeignReader`)."""
    try:
        return Reader(path, prefetch)
    except CheckpointNotFoundError:
        from jaxckpt.interop import foreign

        reader = foreign.open_reader(path)
        if reader is None:
            raise
        return reader  # type: ignore[return-value]  # Reader's interface


def open(path: str | os.PathLike[str]) -> Reader:  # noqa: A001 - the public name is jc.open
    """Opens a checkpoint lazily (a jaxckpt checkpoint, or an Orbax, Flax msgpack or
    safetensors one); see :class:`Reader`."""
    return open_reader(path)


def list_variables(path: str | os.PathLike[str]) -> list[tuple[str, tuple[int, ...], str]]:
    """``[(path, shape, dtype_name), ...]`` of every leaf, sorted by path; reads no array."""
    return open_reader(path).variables()
