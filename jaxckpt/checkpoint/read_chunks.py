"""Reading the arrays of one checkpoint: whole arrays chunk file by chunk file, packed leaves
cut out of their pack's chunks, everything else through TensorStore; every chunk's CRC-32C is
checked and every record is compared with its array's (or pack's) ``zarr.json`` before a read.

:class:`ChunkReading` is the reading side of :class:`jaxckpt.checkpoint.reader.Reader` (which
holds the lookup of records and metadata); it reads through the reader's store.
"""

from __future__ import annotations

import bisect
import functools
import operator
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.errors import CheckpointError
from jaxckpt.format import checksum as _checksum
from jaxckpt.format import commit as _commit
from jaxckpt.format import validate as _validate
from jaxckpt.format.metadata import Record
from jaxckpt.log import phase
from jaxckpt.storage import arrays as _arrays
from jaxckpt.storage import chunk_files as _chunks
from jaxckpt.storage import confine as _confine

Index = tuple[slice | int, ...]


class ChunkReading:
    """The reading of array data, mixed into :class:`~jaxckpt.checkpoint.reader.Reader`."""

    path: str
    commit: _commit.Commit
    _store: Any  # the checkpoint's jaxckpt.storage.Store
    _files: str | None  # its directory, where chunk files are read with os calls
    _present: set[str]  # arrays whose unlisted chunks were found on disk

    def record(self, path: str) -> Record:
        raise NotImplementedError

    def metadata_file(self, key: str) -> Any:
        raise NotImplementedError

    def _error(self, path: str, e: Exception) -> Exception:
        raise NotImplementedError

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

    def _read_direct(self, rec: Record) -> np.ndarray:
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

    def _read_packed(self, loc: str, recs: list[Record], paths: list[str]) -> list[np.ndarray]:
        """Leaves packed in the 1-D uint8 array ``loc``: each needed chunk is read once.

        Each run of consecutive needed chunks is read into one aligned buffer, and every leaf
        is a view into it (leaves start at 64-byte aligned offsets): no per-leaf copy.
        """
        spans = [r["packed"][:2] for r in recs]  # checked: [offset, nbytes], ints
        try:
            if self._files is None:  # no files to read directly: TensorStore reads the spans
                meta = self.metadata_file(f"{loc}/zarr.json")
                store = self._store.open_array(loc, meta, create=False).result()
                self._check_pack(loc, recs, paths, store)
                futs = [store[o : o + n].read() for o, n in spans]
                return [_view(f.result(), 0, r) for f, r in zip(futs, recs, strict=True)]
            self._check_pack(loc, recs, paths)
            issued = self._prefetched.pop(loc, None)  # the whole pack, if read ahead
            if issued is None:
                size = int(recs[0]["packed"][2])  # the pack's chunk size
                need = sorted(
                    {k for o, n in spans if n for k in range(o // size, -(-(o + n) // size))}
                )
                if (
                    all("crc32c" in r for r, (_, n) in zip(recs, spans, strict=True) if n)
                    and sum(n for _, n in spans) * 8 < len(need) * size
                ):
                    if len(recs) == 1:  # no thread hand-off for a single leaf
                        return [self._read_one_packed(recs[0], paths[0])]
                    return list(_runtime.pool("read").map(self._read_one_packed, recs, paths))
                issued = self._issue_chunk_runs(loc, need, size)
            starts, bufs, reads = issued
            for read in reads:
                read.result()
        except (OSError, _chunks.ChunkError, ValueError, KeyError) as e:
            one = len(paths) == 1 or isinstance(e, _confine.Violation)  # names the first
            raise self._error(paths[0] if one else loc, e) from e
        out = []
        for (o, n), rec in zip(spans, recs, strict=True):
            if not n:
                out.append(np.empty(rec["shape"], np.dtype(rec["dtype"])))
                continue
            i = bisect.bisect_right(starts, o) - 1
            out.append(_view(bufs[i], o - starts[i], rec))
        return out

    @functools.cached_property
    def _prefetched(self) -> dict[str, tuple[list[int], list[np.ndarray], list[Future[None]]]]:
        """``{loc: what _issue_chunk_runs returned}`` of the packs read ahead, whole."""
        return {}

    def prefetch_packs(self) -> None:
        """Starts reading every pack of a checkpoint on a local disk, whole, on the I/O threads,
        and returns. A restore that reads every leaf calls it before it checks and matches the
        records (CPU work), so that the disk reads the packs meanwhile. The packs are the ones
        ``COMMIT`` holds the checksum of a ``zarr.json`` for; each such file is read and checked
        here, as before any read of a pack. A pack that fails a check is left to the read
        proper, which names the leaf."""
        sums = self.commit.checksums
        if self._files is None or not sums:  # an object store, or a version 2 checkpoint
            return
        prefix, suffix = f"{_plan.PACK_DIR}/", "/zarr.json"
        for key in sums:
            loc = key[: -len(suffix)]
            if (
                not (key.startswith(prefix) and key.endswith(suffix))
                or loc in self._prefetched
                or _confine.path_problem(loc) is not None  # the read proper refuses it
            ):
                continue
            try:
                self._check_pack(loc, [], [])
            except (OSError, CheckpointError, _confine.Violation, ValueError):
                continue
            length, size = self._packs[loc]
            self._prefetched[loc] = self._issue_chunk_runs(
                loc, list(range(-(-length // size))), size
            )

    def _issue_chunk_runs(
        self, loc: str, need: list[int], size: int
    ) -> tuple[list[int], list[np.ndarray], list[Future[None]]]:
        """Starts reading the chunks ``need`` of the pack ``loc`` (chunks of ``size`` bytes),
        each run of consecutive ones into one aligned buffer: (each run's first byte, its
        buffer, the reads to wait for)."""
        assert self._files is not None  # read directly only from a store of files
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
                os.path.join(base, str(k)),
                buf[(k - a) * size : (k - a + 1) * size],
            )
            for (a, b), buf in zip(runs, bufs, strict=True)
            for k in range(a, b)
        ]
        io = _runtime.pool("read")
        reads = [io.submit(_chunks.read_chunk_into, path, out) for path, out in jobs]
        return [a * size for a, _ in runs], bufs, reads

    def _check_pack(
        self, loc: str, recs: list[Record], paths: list[str], store: Any = None
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

    def _read_one_packed(self, rec: Record, path: str) -> np.ndarray:
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
        return _view(buf, 0, rec)

    def _read_ts(
        self, requests: Sequence[tuple[str, Index | None]], recs: list[Record]
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

    def _check_present(self, rec: Record) -> None:
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


def _view(buf: np.ndarray, offset: int, rec: Record) -> np.ndarray:
    """The leaf ``rec`` as a view of its bytes from ``offset`` in the 1-D uint8 ``buf``, made
    by one constructor (slicing, viewing and reshaping cost three times more)."""
    return np.ndarray(rec["shape"], _validate.dtype_named(rec["dtype"]), buf, offset)


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


def _array_meta(rec: Record) -> dict[str, Any]:
    """The zarr metadata of an array leaf, rebuilt from its record (no file read)."""
    return _arrays.array_metadata(rec["shape"], rec.get("stored", rec["dtype"]), rec["chunks"])
