"""Reading every array of a checkpoint in bounded blocks: ``verify`` and ``diff``.

Arrays are read in blocks of whole chunks along their first axis, at most ``BLOCK_BYTES``
each, and many blocks are read together (one batch of reads: chunk files on a local disk,
TensorStore elsewhere), so a checkpoint of any size is scanned with bounded memory and without
one round trip per leaf.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint.reader import Reader
from jaxckpt.errors import CheckpointError, CorruptCheckpointError
from jaxckpt.format import validate as _validate
from jaxckpt.format.metadata import Record
from jaxckpt.storage import chunk_files as _chunks
from jaxckpt.storage import confine as _confine

BLOCK_BYTES = 16 << 20
BATCH_BYTES = 64 << 20
Request = tuple[str, Any, int]  # (path, index or None, nbytes)


def nbytes(rec: Record) -> int | None:
    """Bytes of an array leaf's data; None for a leaf that is not an array."""
    if rec["t"] != "array":
        return None
    return math.prod(rec["shape"]) * np.dtype(rec["dtype"]).itemsize


def _blocks(path: str, rec: Record) -> list[Request]:
    total = nbytes(rec) or 0
    shape = rec["shape"]
    if not shape or total <= BLOCK_BYTES or shape[0] <= 1:
        return [(path, None, total)]
    row = total // shape[0]
    chunk0 = max(1, (rec.get("chunks") or [1])[0])
    rows = max(chunk0, BLOCK_BYTES // max(row, 1) // chunk0 * chunk0)
    return [
        (path, (slice(i, min(i + rows, shape[0])),), (min(i + rows, shape[0]) - i) * row)
        for i in range(0, shape[0], rows)
    ]


def _batches(requests: list[Request]) -> Iterator[list[Request]]:
    batch: list[Request] = []
    held = 0
    for r in requests:
        batch.append(r)
        held += r[2]
        if held >= BATCH_BYTES or len(batch) >= 4096:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _read(reader: Reader, batch: list[Request], damaged: dict[str, str]) -> list[np.ndarray | None]:
    """Reads a batch; on failure, reads its blocks one by one to name every damaged array."""
    todo = [r for r in batch if r[0] not in damaged]
    try:
        got = iter(reader.read_many([(p, i) for p, i, _ in todo]))
        return [None if r[0] in damaged else next(got) for r in batch]
    except CheckpointError:
        pass
    out: list[np.ndarray | None] = []
    for p, index, _ in batch:
        if p in damaged:
            out.append(None)
            continue
        try:
            out.append(reader.read_many([(p, index)])[0])
        except CheckpointError as e:
            damaged[p] = str(e.__cause__ or e)
            out.append(None)
    return out


class Progress:
    """A one-line progress report on a stream: redrawn in place on a terminal, else a line
    every ``every`` seconds (5 s when not a terminal). Silent when ``quiet``."""

    def __init__(self, stream: TextIO, *, quiet: bool = False, every: float | None = None):
        self.stream, self.quiet = stream, quiet
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every = every if every is not None else (0.2 if self.tty else 5.0)
        self.total = 0
        self._last = time.monotonic()

    def update(self, done: int, label: str = "verify") -> None:
        now = time.monotonic()
        if self.quiet or now - self._last < self.every:
            return
        self._last = now
        self._write(done, label)

    def close(self, done: int, label: str = "verify") -> None:
        if not self.quiet:
            self._write(done, label)
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()

    def _write(self, done: int, label: str) -> None:
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(frac * 30)
        line = f"{label}: [{bar:<30}] {frac:6.1%}  {human_bytes(done)} of {human_bytes(self.total)}"
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclasses.dataclass
class VerifyReport:
    arrays: int
    nbytes: int
    damaged: dict[str, str]  # leaf path -> what is wrong with it
    files: list[str] = dataclasses.field(default_factory=list)  # damaged files, each named


def verify(reader: Reader, progress: Progress) -> VerifyReport:
    """Checks every ``zarr.json`` against the checksum ``COMMIT`` holds, every chunk of every
    array and of every pack against its own crc32c, and each packed leaf against its own."""
    files = _metadata_problems(reader)
    try:
        records = reader.records
    except CorruptCheckpointError as e:  # a group file keeping a split record: nothing to scan
        return VerifyReport(0, 0, {}, files if files else [str(e)])
    damaged: dict[str, str] = {}
    requests = [r for p, rec in records.items() if rec["t"] == "array" for r in _blocks(p, rec)]
    progress.total = sum(r[2] for r in requests)
    done = 0
    for batch in _batches(requests):
        _read(reader, batch, damaged)
        done += sum(r[2] for r in batch)
        progress.update(done)
    files += _pack_problems(reader, records)
    for p, rec in records.items():
        if rec["t"] == "array" and p not in damaged and reader.commit.checksums is None:
            problem = _zarr_json_problem(reader.path, rec)  # no checksums: what can be seen
            if problem:
                damaged[p] = problem
        if rec["t"] != "array":
            try:
                reader.read(p)
            except Exception as e:  # a value the metadata cannot decode
                damaged[p] = f"its saved value cannot be decoded ({e})"
    progress.close(done)
    n_arrays = sum(1 for rec in records.values() if rec["t"] == "array")
    return VerifyReport(n_arrays, progress.total, damaged, files)


def _metadata_problems(reader: Reader) -> list[str]:
    """What is wrong with each ``zarr.json`` that ``COMMIT`` lists (none in version 2)."""
    sums = reader.commit.checksums
    if sums is None:
        return []
    keys = sorted(sums)
    datas = _storage.at(reader.path).read_many(keys)
    out = []
    for key, data in zip(keys, datas, strict=True):
        try:
            reader.commit.check(key, data)
        except CorruptCheckpointError as e:
            out.append(str(e))
    return out


def _pack_problems(reader: Reader, records: dict[str, Record]) -> list[str]:
    """Every chunk of every pack read whole and checked against its crc32c: the bytes between
    and after the packed leaves too, which reading the leaves may skip."""
    out = []
    for loc in sorted({r["loc"] for r in records.values() if r["t"] == "array" and "packed" in r}):
        where = f"{_storage.join(reader.path, loc)}/zarr.json"
        try:
            meta = reader.metadata_file(f"{loc}/zarr.json")
            n, size = _validate.pack_json(meta, where)  # bounded before anything is read
            chunks = range(-(-n // size))
        except CorruptCheckpointError:
            continue  # reported with the other metadata files
        except _confine.Violation as e:  # crafted, or version 2 (nothing vouches for it)
            out.append(f"{where} describes no pack jaxckpt writes: its leaves {e}")
            continue
        store = _storage.at(reader.path)
        base = store.os_path(f"{loc}/c")
        if base is not None:  # chunk files to read directly

            def check(k: int, base: str = base, size: int = int(size)) -> str | None:
                try:
                    _chunks.read_chunk_into(os.path.join(base, str(k)), np.empty(size, np.uint8))
                except (OSError, _chunks.ChunkError) as e:
                    return str(e)
                return None

            out += [p for p in _runtime.pool("read").map(check, chunks) if p]
            continue
        try:
            array = store.open_array(loc, meta, create=False).result()
            for lo in range(0, len(chunks), 64):  # 64 chunks read at a time: bounded memory
                reads = [array[k * size : (k + 1) * size].read() for k in chunks[lo : lo + 64]]
                for k, f in zip(chunks[lo : lo + 64], reads, strict=True):
                    if f.exception() is not None:
                        out.append(f"the chunk {loc}/c/{k} of {reader.path}: {f.exception()}")
        except ValueError as e:
            out.append(str(_storage.read_error(reader.path, loc, e)))
    return out


_OWN_ARRAY = {"t", "dtype", "shape", "chunks", "loc", "stored", "np_scalar", "zero_chunks"}


def _zarr_json_problem(root: str, rec: Record) -> str | None:
    """What is wrong with the ``zarr.json`` of an array stored at its own local path, if anything.

    jaxckpt reads arrays from its own metadata; this file is what zarr-python reads.
    """
    path = _storage.at(root).os_path(f"{rec['loc']}/zarr.json")  # the loc was checked
    if set(rec) - _OWN_ARRAY or path is None:
        return None  # packed with other leaves, or on a store without files
    try:  # a link could lead to any file of the host (the reads checked the directories)
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return f"{path} is missing, so zarr-python cannot open the array"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path} is a symbolic link; a checkpoint's zarr.json is a regular file"
        return f"{path} cannot be read ({e})"
    except ValueError as e:
        return f"{path} is not valid JSON ({e})"
    stored = rec.get("stored", rec["dtype"])
    if not isinstance(meta, dict) or (meta.get("shape"), meta.get("data_type")) != (
        rec["shape"],
        stored,
    ):
        found = (meta.get("shape"), meta.get("data_type")) if isinstance(meta, dict) else meta
        return f"{path} describes {found}, not the saved {(rec['shape'], stored)}"
    return None


@dataclasses.dataclass
class Diff:
    only_a: list[str]
    only_b: list[str]
    changed: list[str]  # shape, dtype or kind
    values: dict[str, tuple[int, int, float | None]]  # path -> (n differing, size, max abs diff)
    equal: int


def _signature(rec: Record) -> tuple[Any, ...]:
    if rec["t"] == "array":
        return ("array", tuple(rec["shape"]), rec["dtype"])
    return (rec["t"], rec.get("py"))


def _compare(x: np.ndarray, y: np.ndarray) -> tuple[int, float]:
    """(how many elements differ, the largest absolute difference); NaN equals NaN.

    Elements are compared in their own dtype; only the differing ones are widened to measure
    the difference (integers exactly, floats in float64 or complex128).
    """
    ne = x != y
    if x.dtype.kind == "b":
        return int(np.count_nonzero(ne)), float(ne.any())
    if x.dtype.kind in "fc" or (x.dtype.kind == "V" and "float" in x.dtype.name):
        ne &= ~(np.isnan(x) & np.isnan(y))
    if not ne.any():
        return 0, 0.0
    a, b = x[ne], y[ne]
    if x.dtype.kind in "iu" or (x.dtype.kind == "V" and "int" in x.dtype.name):
        whole = np.uint64 if x.dtype.kind == "u" else np.int64
        a, b = a.astype(whole), b.astype(whole)
        hi, lo = np.maximum(a, b), np.minimum(a, b)
        return a.size, float(np.max(hi.astype(np.uint64) - lo.astype(np.uint64)))  # exact mod 2**64
    wide = np.complex128 if x.dtype.kind == "c" else np.float64
    return a.size, float(np.max(np.abs(a.astype(wide) - b.astype(wide))))


def diff(a: Reader, b: Reader, *, atol: float = 0.0) -> Diff:
    """Compares two checkpoints leaf by leaf, reading arrays in bounded blocks."""
    ra, rb = a.records, b.records
    common = [p for p in ra if p in rb]
    out = Diff(
        sorted(p for p in ra if p not in rb), sorted(p for p in rb if p not in ra), [], {}, 0
    )
    out.changed = sorted(p for p in common if _signature(ra[p]) != _signature(rb[p]))
    same = [p for p in common if p not in set(out.changed)]
    arrays = [p for p in same if ra[p]["t"] == "array"]
    for p in same:
        if ra[p]["t"] != "array" and ra[p].get("v") != rb[p].get("v"):
            out.values[p] = (1, 1, None)
    totals: dict[str, tuple[int, float]] = {}
    requests = [r for p in arrays for r in _blocks(p, ra[p])]
    damaged: dict[str, str] = {}
    for batch in _batches(requests):
        xs, ys = _read(a, batch, damaged), _read(b, batch, damaged)
        for (p, _, _), x, y in zip(batch, xs, ys, strict=True):
            if p in damaged or x is None or y is None:
                continue
            n, m = _compare(x, y)
            n0, m0 = totals.get(p, (0, 0.0))
            totals[p] = (n0 + n, max(m0, m) if not (math.isnan(m) or math.isnan(m0)) else math.nan)
    if damaged:
        p, err = next(iter(damaged.items()))
        raise CheckpointError(
            f"Reading {p!r} failed: {err}. Fix: run `jaxckpt verify` on both checkpoints."
        )
    for p in arrays:
        n, m = totals.get(p, (0, 0.0))
        if n and not (m <= atol):
            out.values[p] = (n, math.prod(ra[p]["shape"]), m)
    out.values = dict(sorted(out.values.items()))
    out.equal = len(common) - len(out.changed) - len(out.values)
    return out
