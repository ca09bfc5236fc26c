"""Reading one checkpoint: ``open`` (lazy), ``list_variables``, ``restore`` and ``match``."""

from __future__ import annotations

import bisect
import functools
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from jaxckpt.format import checksum as _checksum
from jaxckpt.format import commit as _commit
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format import run as _run
from jaxckpt.format import split as _split
from jaxckpt.format import validate as _validate
from jaxckpt.log import phase
from jaxckpt.storage import arrays as _arrays
from jaxckpt.storage import chunk_files as _chunks
from jaxckpt.storage import confine as _confine

PyTree = Any
Index = tuple[slice | int, ...]


def _leaf_dtype(rec: dict[str, Any]) -> str:
    if rec["t"] == "array":
        return rec.get("key_dtype", rec["dtype"])
    if rec["t"] == "state":
        return "state"
    return rec["py"]


class Reader:
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
        self._records: dict[str, dict[str, Any]] | None = None
        self._present: set[str] = set()  # arrays whose unlisted chunks were found on disk

    @property
    def structure(self) -> dict[str, Any]:
        """The whole structure record, every split subtree read in (see docs/format.md)."""
        return self._tree.whole()  # type: ignore[return-value]  # the root always exists

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """``{path: leaf record}`` of every leaf, in flatten order."""
        if self._records is None:
            leaves = _metadata.iter_leaves(self.structure)
            self._records = {p: self._checked(p, rec) for p, rec in leaves}
        return self._records

    @functools.cached_property
    def _valid(self) -> set[int]:
        """The ids of the leaf records checked (each is checked once, when first handed out)."""
        return set()

    @functools.cached_property
    def _confined(self) -> Any:
        """The directories found to lie inside this checkpoint (links only a local disk has)."""
        return self._store.confined()

    @functools.cached_property
    def _matched(self) -> set[int]:
        """The ids of the array records found to agree with their array's zarr.json."""
        return set()

    @functools.cached_property
    def _packs(self) -> dict[str, tuple[int, int]]:
        """``{loc: (bytes, chunk bytes)}`` of the packs whose zarr.json was read."""
        return {}

    def _checked(self, path: str, rec: dict[str, Any]) -> dict[str, Any]:
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

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

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

    def find(self, path: str) -> dict[str, Any] | None:
        """The record of the leaf at ``path``, or None; reads only the metadata on its path."""
        if self._records is not None:
            return self._records.get(path)
        node = self._tree.node(path) if isinstance(path, str) else None
        if node is None or node["t"] not in _metadata.LEAF_KINDS:
            return None
        return self._checked(path, node)

    def node(self, path: str) -> dict[str, Any] | None:
        """The structure record at ``path`` (a leaf or an inner node), or None."""
        return self._tree.node("/".join(p for p in path.split("/") if p))

    def leaves(self, prefix: str = "") -> dict[str, dict[str, Any]]:
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

    def record(self, path: str) -> dict[str, Any]:
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

    @phase("restore: read the arrays")
    def read_many(
        self,
        requests: Sequence[tuple[str, Index | None]],
        then: Callable[[int, np.ndarray], Any] | None = None,
    ) -> list[Any]:
        """Reads many array slices with all their I/O issued together.

        Whole arrays of a local checkpoint are read chunk file by chunk file on the I/O
        threads, into 64-byte aligned arrays (which ``jax.device_put`` on CPU adopts without a
        copy); packed leaves are cut out of the chunks of their pack, each chunk read once;
        other slices and other stores go through TensorStore. Every chunk's crc32c is checked.

        ``then(i, array)`` is called on the I/O thread that read request ``i`` whole and
        directly, and its result takes the array's place: a restore starts moving an array
        to its device while others are still being read.
        """
        recs = [self.record(p) for p, _ in requests]
        requests = [
            (p, i if i is None else _checked_index(self.path, p, rec["shape"], i))
            for (p, i), rec in zip(requests, recs, strict=True)
        ]
        out: list[np.ndarray | None] = [None] * len(requests)
        local = self._files is not None
        packed: dict[str, list[int]] = {}
        direct: list[int] = []
        rest: list[int] = []
        for i, ((_, index), rec) in enumerate(zip(requests, recs, strict=True)):
            if "packed" in rec:
                packed.setdefault(rec["loc"], []).append(i)
            elif local and _is_whole(index, rec["shape"]):
                direct.append(i)
            else:
                rest.append(i)
        io = _runtime.pool("read")

        def read_direct(i: int) -> Any:
            arr = self._read_direct(recs[i])
            return arr if then is None else then(i, arr)

        jobs = {i: io.submit(read_direct, i) for i in direct}
        for loc, idx in packed.items():
            leaves = self._read_packed(loc, [recs[i] for i in idx], [requests[i][0] for i in idx])
            for i, arr in zip(idx, leaves, strict=True):
                index = requests[i][1]
                out[i] = arr if index is None else arr[index]
        for i, arr in zip(
            rest, self._read_ts([requests[i] for i in rest], [recs[i] for i in rest]), strict=True
        ):
            out[i] = arr
        for i, job in jobs.items():
            try:
                out[i] = job.result()
            except (OSError, _chunks.ChunkError, _confine.Violation) as e:
                raise self._error(requests[i][0], e) from e
        return out  # type: ignore[return-value]

    def _read_direct(self, rec: dict[str, Any]) -> np.ndarray:
        assert self._files is not None  # read directly only from a store of files
        if id(rec) not in self._matched:  # before the array is allocated
            self._confined.dir(rec["loc"])
            path = os.path.join(self._files, rec["loc"], "zarr.json")
            key = f"{rec['loc']}/zarr.json"
            meta = _confine.read_json(path, lambda data: self.commit.check(key, data))
            problem = _validate.array_json_problem(rec, meta, path)
            if problem is not None:
                raise _confine.Violation(problem)
            self._matched.add(id(rec))
        stored = np.dtype(rec.get("stored", rec["dtype"]))
        arr = _chunks.read_whole(
            self._files,
            rec["loc"],
            rec["shape"],
            rec["chunks"],
            stored,
            rec.get("zero_chunks"),
            self._confined.dir,
        )
        return arr.view(np.dtype(rec["dtype"])) if rec.get("stored") else arr

    def _read_packed(
        self, loc: str, recs: list[dict[str, Any]], paths: list[str]
    ) -> list[np.ndarray]:
        """Leaves packed in the 1-D uint8 array ``loc``: each needed chunk is read once.

        Each run of consecutive needed chunks is read into one aligned buffer, and every leaf
        is a view into it (leaves start at 64-byte aligned offsets): no per-leaf copy.
        """
        spans = [(int(r["packed"][0]), int(r["packed"][1])) for r in recs]
        try:
            if self._files is None:  # no files to read directly: TensorStore reads the spans
                meta = self.metadata_file(f"{loc}/zarr.json")
                store = self._store.open_array(loc, meta, create=False).result()
                self._check_pack(loc, recs, paths, store)
                futs = [store[o : o + n].read() for o, n in spans]
                return [
                    _view(f.result(), 0, n, r)
                    for f, (_, n), r in zip(futs, spans, recs, strict=True)
                ]
            self._check_pack(loc, recs, paths)
            size = int(recs[0]["packed"][2])  # the pack's chunk size
            need = sorted({k for o, n in spans if n for k in range(o // size, -(-(o + n) // size))})
            if (
                all("crc32c" in r for r, (_, n) in zip(recs, spans, strict=True) if n)
                and sum(n for _, n in spans) * 8 < len(need) * size
            ):
                if len(recs) == 1:  # no thread hand-off for a single leaf
                    return [self._read_one_packed(recs[0], paths[0])]
                return list(_runtime.pool("read").map(self._read_one_packed, recs, paths))
            runs: list[list[int]] = []
            for k in need:
                if runs and runs[-1][1] == k:
                    runs[-1][1] = k + 1
                else:
                    runs.append([k, k + 1])
            self._confined.dir(f"{loc}/c")
            bufs = [_memory.aligned_empty([(b - a) * size], np.dtype(np.uint8)) for a, b in runs]
            base = os.path.join(self._files, loc, "c")
            jobs = [
                (
                    _chunks.read_chunk_into,
                    os.path.join(base, str(k)),
                    buf[(k - a) * size : (k - a + 1) * size],
                )
                for (a, b), buf in zip(runs, bufs, strict=True)
                for k in range(a, b)
            ]
            list(_runtime.pool("read").map(lambda j: j[0](*j[1:]), jobs))
        except (OSError, _chunks.ChunkError, ValueError, KeyError) as e:
            one = len(paths) == 1 or isinstance(e, _confine.Violation)  # names the first
            raise self._error(paths[0] if one else loc, e) from e
        starts = [a * size for a, _ in runs]
        out = []
        for (o, n), rec in zip(spans, recs, strict=True):
            if not n:
                out.append(np.empty(rec["shape"], np.dtype(rec["dtype"])))
                continue
            i = bisect.bisect_right(starts, o) - 1
            out.append(_view(bufs[i], o - starts[i], n, rec))
        return out

    def _check_pack(
        self, loc: str, recs: list[dict[str, Any]], paths: list[str], store: Any = None
    ) -> None:
        """Raises unless the places of the packed leaves ``recs`` lie in their pack ``loc``, as
        its zarr.json (or the opened TensorStore ``store``) describes it: before any read."""
        if loc not in self._packs:
            where = _storage.join(self.path, f"{loc}/zarr.json")
            if store is None:
                self._confined.dir(loc)
                key = f"{loc}/zarr.json"
                meta = _confine.read_json(where, lambda data: self.commit.check(key, data))
                size = _validate.pack_json(meta, where)
            else:
                length, chunk = store.shape[0], store.chunk_layout.read_chunk.shape[0]
                problem = _validate.pack_problem(length, store.dtype.name, chunk, where)
                if problem is not None or store.rank != 1:
                    raise _confine.Violation(problem or f"is packed in {where}, not 1-D")
                size = (length, chunk)
            self._packs[loc] = size
        length, chunk = self._packs[loc]
        for rec, path in zip(recs, paths, strict=True):
            problem = _validate.packed_problem(rec, length, chunk)
            if problem is not None:
                raise self._error(path, _confine.Violation(problem))

    def _read_one_packed(self, rec: dict[str, Any], path: str) -> np.ndarray:
        """A packed leaf read alone (a few of the pack's bytes), checked against its own CRC;
        a failure names the leaf's ``path``."""
        offset, n, size = (int(v) for v in rec["packed"])
        buf = _memory.aligned_empty([n], np.dtype(np.uint8))
        assert self._files is not None  # read directly only from a store of files
        base = os.path.join(self._files, rec["loc"], "c")
        try:
            self._confined.dir(f"{rec['loc']}/c")
            for k in range(offset // size, -(-(offset + n) // size)):  # the chunks it spans
                a, b = max(offset, k * size), min(offset + n, (k + 1) * size)
                _chunks.read_range_into(
                    os.path.join(base, str(k)), a - k * size, buf[a - offset : b - offset]
                )
            if n and _checksum.crc32c(buf) != rec["crc32c"]:
                raise _chunks.ChunkError(
                    f"the bytes of this leaf in {base} fail its crc32c checksum"
                )
        except (OSError, _chunks.ChunkError, _confine.Violation) as e:
            raise self._error(path, e) from e
        return _view(buf, 0, n, rec)

    def _read_ts(
        self, requests: Sequence[tuple[str, Index | None]], recs: list[dict[str, Any]]
    ) -> list[np.ndarray]:
        opened = {}
        for (p, _), rec in zip(requests, recs, strict=True):
            if rec["loc"] not in opened:
                try:  # TensorStore's file driver follows links: none may lead out
                    self._confined.tree(rec["loc"])
                except _confine.Violation as e:
                    raise self._error(p, e) from e
                opened[rec["loc"]] = self._store.open_array(
                    rec["loc"],
                    _array_meta(rec),
                    create=False,
                    assume=False,  # TensorStore compares the record with the array's zarr.json
                    fill_missing="zero_chunks" in rec,
                )
        futures = []
        for (p, index), rec in zip(requests, recs, strict=True):
            try:
                store = opened[rec["loc"]].result()
                self._check_present(rec)
            except Exception as e:
                raise self._error(p, _confine.ts_mismatch(e)) from e
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

    def _check_present(self, rec: dict[str, Any]) -> None:
        """Raises ``ChunkError`` when a chunk the record does not list as zeros is missing.

        TensorStore reads an array with listed absent chunks filling every missing chunk with
        zeros; this check keeps any other missing chunk an error (once per array and reader).
        """
        zero = rec.get("zero_chunks")
        if zero is None or zero == "all" or rec["loc"] in self._present:
            return
        grid = _chunks.chunk_grid(rec["shape"], rec["chunks"])
        absent = _chunks.zero_set(zero, 0)
        want = [
            _chunks.chunk_key(c)
            for c in np.ndindex(*grid)
            if _chunks.flat_index(c, grid) not in absent
        ]
        base = _storage.join(self.path, rec["loc"])
        missing = self._store.child(rec["loc"]).missing(want)
        if missing:
            where = f"{base}/{missing[0]}"
            raise _chunks.ChunkError(f"the chunk file {where} is missing")
        self._present.add(rec["loc"])

    def _value(self, rec: dict[str, Any]) -> Any:
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

        def leaf(path: str, rec: dict[str, Any]) -> Any:
            if rec["t"] != "array":
                return self._value(rec)
            arr = values[f"{base}/{path}" if base and path else (base or path)]
            if "key" in rec:
                return _metadata.load_key(rec, arr)
            return arr[()] if rec.get("np_scalar") else arr

        return _metadata.rebuild(node, leaf)


def _view(buf: np.ndarray, offset: int, nbytes: int, rec: dict[str, Any]) -> np.ndarray:
    return buf[offset : offset + nbytes].view(np.dtype(rec["dtype"])).reshape(rec["shape"])


def _checked_index(where: str, path: str, shape: Sequence[int], index: Any) -> Index:
    """``index`` checked against ``shape`` as NumPy indexes, its ints and slices made
    non-negative and clipped, as TensorStore reads them; out of range is an ``IndexError``
    naming the leaf (not a read error that would call the checkpoint damaged)."""
    idx = index if isinstance(index, tuple) else (index,)
    try:
        np.broadcast_to(np.empty((), np.bool_), tuple(shape))[idx]  # zero strides: no allocation
    except (IndexError, TypeError, ValueError) as e:
        raise IndexError(
            f"The index {index!r} does not fit the leaf {path!r} of shape {tuple(shape)} "
            f"in the checkpoint {where} ({e}). Fix: index within that shape; reader.read(path) "
            "reads the whole leaf."
        ) from None
    out: list[slice | int] = []
    for s, n in zip(idx, shape, strict=False):
        if isinstance(s, slice) and (s.step is None or s.step > 0):
            start, stop, step = s.indices(n)
            out.append(slice(start, max(start, stop), step))
            continue
        try:
            i = operator.index(s)  # not a slice
        except TypeError:
            return idx  # an Ellipsis, a new axis, an array: TensorStore takes it as it is
        out.append(i + n if i < 0 else i)
    return (*out, *idx[len(out) :])


def _is_whole(index: Index | None, shape: Sequence[int]) -> bool:
    if index is None:
        return True
    if len(index) != len(shape):
        return False
    return all(
        isinstance(s, slice) and s.indices(n) == (0, n, 1)
        for s, n in zip(index, shape, strict=True)
    )


def _array_meta(rec: dict[str, Any]) -> dict[str, Any]:
    """The zarr metadata of an array leaf, rebuilt from its record (no file read)."""
    return _arrays.array_metadata(rec["shape"], rec.get("stored", rec["dtype"]), rec["chunks"])


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
