"""Reading safetensors files in byte ranges: :class:`File` (positioned reads of one file,
local with ``os.preadv`` into the array's own buffer, or TensorStore kvstore byte ranges on an
object store), :class:`Tensor` (where a tensor's bytes lie) and :func:`read_box` (a slice of a
tensor read as runs of contiguous bytes). Parsing the header is
:mod:`jaxckpt.interop.safetensors_header`.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Any

import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import storage as _storage
from jaxckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from jaxckpt.interop.source import Index

# Reads of a slice are runs of at least this many bytes where they can be (smaller ones are
# widened): a positioned read of a local file costs about as much as a few KiB of copying, a
# request to an object store as much as about a MiB of transfer.
MIN_RUN = 4096
MIN_RUN_URL = 1 << 20


def no_files(path: str) -> bool:
    """Whether ``path`` is on a store without files (an object store): read in byte ranges."""
    return _storage.at(path).os_path() is None


class File:
    """Positioned reads of one file: local (``os.preadv``) or on an object store (TensorStore
    kvstore byte ranges)."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._kv: Any = None
        if no_files(path):
            parent, name = path.rsplit("/", 1)
            self._kv, self._name = _storage.at(parent).open_kv(), name
        else:
            try:
                self._fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise CheckpointNotFoundError(
                    f"No safetensors file at {path}. Fix: check the path (a sharded set needs "
                    "every file its index names)."
                ) from None

    def size(self) -> int:
        if self._fd is not None:
            return os.fstat(self._fd).st_size
        return -1  # unknown without a read; object stores are checked by the reads themselves

    def read(self, start: int, stop: int) -> bytes:
        return bytes(self.read_into(np.empty(stop - start, np.uint8), start))

    def read_all(self) -> bytes:
        """The whole file."""
        size = self.size()
        return self.read(0, size) if size >= 0 else self._kv.read(self._name).result().value

    def read_into(self, out: np.ndarray, start: int) -> np.ndarray:
        """Fills ``out``'s bytes from ``start`` on; returns ``out``."""
        view = out.reshape(-1).view(np.uint8).data
        if self._fd is None:
            got = self._kv.read(self._name, byte_range=slice(start, start + len(view))).result()
            if got.state != "value" or len(got.value) != len(view):
                raise self._short(start, start + len(view))
            view[:] = got.value
            return out
        done = 0
        while done < len(view):  # a read may return fewer bytes than asked (2 GiB at most)
            n = os.preadv(self._fd, [view[done:]], start + done)
            if n == 0:
                raise self._short(start + done, start + len(view))
            done += n
        return out

    def read_runs(self, runs: list[tuple[np.ndarray, int]]) -> None:
        """Fills each ``(out, start)``'s ``out`` from ``start`` on; on an object store the
        byte ranges are requested together."""
        if self._fd is not None:
            for out, start in runs:
                self.read_into(out, start)
            return
        views = [out.reshape(-1).view(np.uint8).data for out, _ in runs]
        futures = [
            self._kv.read(self._name, byte_range=slice(start, start + len(v)))
            for v, (_, start) in zip(views, runs, strict=True)
        ]
        for view, (_, start), future in zip(views, runs, futures, strict=True):
            got = future.result()
            if got.state != "value" or len(got.value) != len(view):
                raise self._short(start, start + len(view))
            view[:] = got.value

    def _short(self, start: int, stop: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"The safetensors file {self.path} is shorter than its header says (bytes "
            f"{start}..{stop} are not there). Fix: "
            + ("upload it again." if self._fd is None else "download it again.")
        )

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Tensor:
    """Where one tensor's bytes lie: ``file``, bytes ``start`` to ``stop``."""

    __slots__ = ("file", "name", "dtype", "shape", "start", "stop")

    def __init__(self, file: File, name: str, dtype: np.dtype, shape: tuple, start: int, stop: int):
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape
        self.start, self.stop = start, stop


def read_box(t: Tensor, index: Index) -> np.ndarray:
    """The slice ``index`` of the tensor ``t``, reading only the box of elements it spans.

    The box's rows are contiguous in the file where every later axis is read whole, so the
    box is read as runs of that many bytes, one positioned read each. Runs shorter than
    :data:`MIN_RUN` (a slice of the last axis of a narrow tensor) are widened to whole rows of
    a leading axis instead: fewer, larger reads for a few more bytes.
    """
    shape, item = t.shape, t.dtype.itemsize
    picks: list[range | int] = []
    for s, n in zip(index, shape, strict=False):
        if isinstance(s, slice):
            picks.append(range(*s.indices(n)))
        else:
            try:
                i = operator.index(s)
            except TypeError:  # an Ellipsis, a new axis, an array of indices: read it all
                whole = t.file.read_into(_memory.aligned_empty(shape, t.dtype), t.start)
                return whole[index]
            picks.append(i + n if i < 0 else i)
    if any(isinstance(p, range) and not p for p in picks):
        return np.empty(shape, t.dtype)[index]
    picks += [range(n) for n in shape[len(picks) :]]
    los = [min(p) if isinstance(p, range) else p for p in picks]
    his = [max(p) + 1 if isinstance(p, range) else p + 1 for p in picks]
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    j = len(shape) - 1  # the first axis from which on the box is contiguous
    while j > 0 and (los[j], his[j]) == (0, shape[j]):
        j -= 1
    least = MIN_RUN_URL if no_files(t.file.path) else MIN_RUN
    while j > 0 and (his[j] - los[j]) * strides[j] * item < least:
        los[j], his[j] = 0, shape[j]
        j -= 1
    for d in range(j + 1, len(shape)):
        los[d], his[d] = 0, shape[d]
    box = _memory.aligned_empty([h - lo for lo, h in zip(los, his, strict=True)], t.dtype)
    runs = []
    for lead in np.ndindex(*box.shape[:j]):
        first = sum((los[d] + c) * strides[d] for d, c in enumerate(lead)) + los[j] * strides[j]
        runs.append((box[lead], t.start + first * item))
    t.file.read_runs(runs)
    rel = tuple(
        p - lo
        if isinstance(p, int)
        else slice(p.start - lo, p.stop - lo if p.step > 0 else None, p.step)
        for p, lo in zip(picks, los, strict=True)
    )
    if all(
        isinstance(r, slice) and r == slice(0, n, 1) for r, n in zip(rel, box.shape, strict=True)
    ):
        return box
    return box[rel]
