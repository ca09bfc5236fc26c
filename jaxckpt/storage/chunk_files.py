"""zarr v3 chunk files read and written directly on a local disk: the fast path.

Every array jaxckpt writes uses the codecs ``bytes`` (little endian, C order) then ``crc32c``,
so one stored chunk is the chunk's raw bytes followed by their CRC-32C (4 bytes, little
endian), at the key ``c/i/j/...``. Writing and reading those files with plain ``os`` calls from
a thread pool skips TensorStore's per-array open, its chunk cache copies and its per-file
round trips; the files are byte for byte what TensorStore and zarr-python read and write.
Edge chunks are full-sized and padded with the fill value (zero), as zarr v3 requires.

A chunk whose bytes are all zero may be left unwritten (``write_piece(..., skip_zeros=True)``):
zarr v3 reads an absent chunk as the fill value, zero. The leaf record lists such chunks
(``"zero_chunks"``), so that :func:`read_whole` fills them in without a read and still reports
any other missing chunk as damage.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import math
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from jaxckpt import runtime as _runtime
from jaxckpt.format.checksum import crc32c
from jaxckpt.memory import Zeros, aligned_empty, as_bytes, is_zero
from jaxckpt.storage.confine import Violation

# Bytes per os.write / os.readv of a chunk, checksummed just before it is written or just after
# it is read, while in the CPU cache (and a snapshot waits for at most about one such write).
STEP = 2 << 20
FILES_FIRST = 64 << 20  # an array larger than this is allocated once its chunk files are seen


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    """The number of chunks along each dimension."""
    return tuple(-(-int(n) // int(c)) for n, c in zip(shape, chunks, strict=True))


def flat_index(coords: Sequence[int], grid: Sequence[int]) -> int:
    """A chunk's index in C order over the chunk grid (what ``"zero_chunks"`` lists)."""
    flat = 0
    for k, g in zip(coords, grid, strict=True):
        flat = flat * g + k
    return flat


def zero_set(zero: str | Sequence[int] | None, n_chunks: int) -> set[int]:
    """The flat indices a record's ``"zero_chunks"`` (``"all"``, a list, or none) names."""
    if zero is None:
        return set()
    return set(range(n_chunks)) if zero == "all" else {int(k) for k in zero}


# ---------------------------------------------------------------------------- writing


def write_file(path: str, parts: Iterable[Any]) -> os.stat_result:
    """Writes ``parts`` (buffers) to a new file at ``path``; :func:`make_durable` syncs it.
    Returns the file's status once written (what an incremental save records of it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for part in parts:
            mv = memoryview(part).cast("B")
            while mv:
                _runtime.after_snapshots()
                mv = mv[os.write(fd, mv[:STEP]) :]
        return os.fstat(fd)
    finally:
        os.close(fd)


def write_chunk(path: str, data: np.ndarray) -> os.stat_result:
    """One chunk file: ``data``'s bytes (C-contiguous) then their CRC-32C.

    The checksum is taken a step at a time, just before the step is written: the bytes are
    then read from memory once, not once for the checksum and again for the write.
    """
    raw = as_bytes(data)

    def parts() -> Iterable[Any]:
        crc = 0
        for lo in range(0, raw.size, STEP):
            crc = crc32c(raw[lo : lo + STEP], crc)
            yield raw[lo : lo + STEP]
        yield crc.to_bytes(4, "little")

    return write_file(path, parts())


def json_bytes(obj: Any) -> bytes:
    """The bytes of every ``zarr.json`` jaxckpt writes: ``COMMIT`` holds their checksums."""
    return json.dumps(obj, separators=(",", ":")).encode()


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file(path, [json_bytes(obj)])


def make_durable(root: str) -> None:
    """Makes every file and directory written under ``root`` durable.

    One ``syncfs`` of the file system replaces thousands of ``fsync`` calls (each one a
    journal commit and a disk cache flush); where ``syncfs`` is missing
    every file and directory under ``root`` is fsynced from the I/O threads.
    """
    fd = os.open(root, os.O_RDONLY)
    try:
        if _syncfs is not None:
            if _syncfs(fd) == 0:
                return
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({root}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)
    paths = [os.path.join(d, n) for d, _, files in os.walk(root) for n in [*files, "."]]
    list(_runtime.pool("write").map(fsync_path, paths))


def fsync_path(path: str) -> None:
    """Makes one file or directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _find_syncfs() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_syncfs = _find_syncfs()


def chunk_key(coords: Sequence[int]) -> str:
    return "/".join(["c", *map(str, coords)]) if coords else "c"


def covered(
    shape: Sequence[int], chunks: Sequence[int], index: Sequence[slice]
) -> Iterable[tuple[int, ...]]:
    """The coordinates of every chunk a piece (a slice of the array) touches."""
    ranges = []
    for n, c, s in zip(shape, chunks, index, strict=True):
        start, stop, _ = s.indices(n)
        ranges.append(range(start // c, -(-stop // c)) if stop > start else range(0))
    return itertools.product(*ranges)


def piece_chunks(
    shape: Sequence[int], chunks: Sequence[int], index: Sequence[slice]
) -> list[tuple[tuple[int, ...], tuple[slice, ...], bool]] | None:
    """The chunks covering one piece: ``[(coords, slice_in_piece, padded), ...]``.

    None when the piece does not cover whole chunks (then TensorStore writes it).
    """
    ranges: list[list[tuple[int, int]]] = []
    starts = []
    for n, c, s in zip(shape, chunks, index, strict=True):
        start, stop, step = s.indices(n)
        if step != 1 or start % c or (stop % c and stop != n) or stop <= start:
            return None
        starts.append(start)
        ranges.append([(k, min((k + 1) * c, n)) for k in range(start // c, -(-stop // c))])
    out = []
    for combo in itertools.product(*ranges):
        coords = tuple(k for k, _ in combo)
        local = tuple(
            slice(k * c - s0, hi - s0) for (k, hi), c, s0 in zip(combo, chunks, starts, strict=True)
        )
        padded = any(hi - k * c != c for (k, hi), c in zip(combo, chunks, strict=True))
        out.append((coords, local, padded))
    return out


def write_piece(
    root: str,
    loc: str,
    dtype: str,
    chunks: Sequence[int],
    shape: Sequence[int],
    index: Sequence[slice],
    host: Callable[[], np.ndarray | Zeros],
    skip_zeros: bool = False,
    put: Callable[[str, np.ndarray], Any] | None = None,
) -> list[tuple[int, ...]] | None:
    """Writes the chunk files of one piece (each by ``put(path, chunk)``, else
    :func:`write_chunk`); returns the
    coordinates of the all-zero chunks it left unwritten (``skip_zeros``), or None when the
    piece does not cover whole chunks (the caller then writes it through TensorStore)."""
    plan = piece_chunks(shape, chunks, index)
    if plan is None:
        return None
    data = host()
    if isinstance(data, Zeros):
        if skip_zeros:
            return [coords for coords, _, _ in plan]
        data = data.array()
    if data.dtype.name != dtype:
        data = data.view(dtype)
    base = os.path.join(root, loc)
    skipped = []
    for coords, local, padded in plan:
        part = data[local]
        if padded:
            full = np.zeros(chunks, part.dtype)
            full[tuple(slice(0, n) for n in part.shape)] = part
            part = full
        part = np.ascontiguousarray(part)
        if skip_zeros and is_zero(part):
            skipped.append(coords)
            continue
        path = os.path.join(base, chunk_key(coords))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        (put or write_chunk)(path, part)
    return skipped


# ---------------------------------------------------------------------------- reading


class ChunkError(ValueError):
    """A chunk file is missing, truncated or fails its checksum."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _open_chunk(path: str) -> int:
    """Opens a chunk file to read; a symbolic link is refused: a link placed in a checkpoint
    could lead to any file of the host (the directories above are checked by the reader)."""
    try:
        return os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        raise ChunkError(f"the chunk file {path} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Violation(
                f"has the chunk file {path}, a symbolic link (a chunk file is a regular file)"
            ) from None
        raise


def read_chunk_into(path: str, out: np.ndarray) -> None:
    """Reads the chunk at ``path`` into the C-contiguous ``out`` and checks its CRC-32C."""
    raw = as_bytes(out)
    fd = _open_chunk(path)
    try:
        if hasattr(os, "posix_fadvise") and raw.size > (1 << 20):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead: cold reads
        size = os.fstat(fd).st_size
        if size != raw.size + 4:
            raise ChunkError(f"the chunk file {path} has {size} bytes, expected {raw.size + 4}")
        crc, lo = 0, 0
        while lo < raw.size:
            n = os.readv(fd, [raw[lo : lo + STEP]])  # type: ignore[list-item]
            if n == 0:
                raise ChunkError(f"the chunk file {path} ended early")
            crc = crc32c(raw[lo : lo + n], crc)  # while the bytes are in the CPU cache
            lo += n
        stored = os.read(fd, 4)
    finally:
        os.close(fd)
    if int.from_bytes(stored, "little") != crc:
        raise ChunkError(f"the chunk file {path} fails its crc32c checksum")


def read_range_into(path: str, offset: int, out: np.ndarray) -> None:
    """Reads ``out.size`` bytes of the chunk file at ``path`` from ``offset`` (no checksum: the
    caller checks what it reads against its own)."""
    fd = _open_chunk(path)
    try:
        mv = memoryview(as_bytes(out))  # type: ignore[arg-type]
        while mv:
            n = os.preadv(fd, [mv], offset)
            if n == 0:
                raise ChunkError(f"the chunk file {path} ended early")
            mv, offset = mv[n:], offset + n
    finally:
        os.close(fd)


def read_whole(
    root: str,
    loc: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype,
    zero: str | Sequence[int] | None = None,
    confine: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Reads a whole array chunk by chunk into an aligned array (unaligned chunks copied).

    The chunks ``zero`` lists (a record's ``"zero_chunks"``) are zeros and are not read.
    ``confine(directory)`` is called with each chunk's directory (relative to ``root``)
    before anything is read: the reader's check that it lies inside the checkpoint. An array
    over ``FILES_FIRST`` bytes is allocated only once its chunk files are found to hold it.
    """
    if zero == "all":
        return aligned_empty(shape, dtype, zeros=True)
    if math.prod(shape) == 0:
        return aligned_empty(shape, dtype)
    base = os.path.join(root, loc)
    plan = piece_chunks(shape, chunks, tuple(slice(0, n) for n in shape))
    assert plan is not None
    grid = chunk_grid(shape, chunks)
    absent = zero_set(zero, 0)
    reads = []
    for coords, local, padded in plan:
        if absent and flat_index(coords, grid) in absent:
            continue
        key = chunk_key(coords)
        if confine is not None:
            confine(f"{loc}/{key}".rpartition("/")[0])
        reads.append((os.path.join(base, key), local, padded))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > FILES_FIRST:  # sizes a crafted record claims are bounded by the files
        expect = math.prod(chunks) * dtype.itemsize + 4
        for path, _, _ in reads:
            _check_size(path, expect)
    out = aligned_empty(shape, dtype, zeros=bool(zero))
    for path, local, padded in reads:
        dest = out[local] if local else out[...]  # a 0-d array's view, not a copied scalar
        if not padded and dest.flags.c_contiguous:
            read_chunk_into(path, dest)
        else:
            tmp = np.empty(chunks, out.dtype)
            read_chunk_into(path, tmp)
            dest[...] = tmp[tuple(slice(0, n) for n in dest.shape)]
    return out


def _check_size(path: str, expect: int) -> None:
    """Raises unless ``path`` is a regular file of ``expect`` bytes (links not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ChunkError(f"the chunk file {path} is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise Violation(
            f"has the chunk file {path}, a symbolic link (a chunk file is a regular file)"
        )
    if st.st_size != expect:
        raise ChunkError(f"the chunk file {path} has {st.st_size} bytes, expected {expect}")
