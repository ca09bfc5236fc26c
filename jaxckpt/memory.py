"""Host memory as jaxckpt hands it around: aligned buffers, byte views, known-zero pieces."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALIGN = 64  # XLA's CPU client aliases host buffers this aligned instead of copying them
ZERO_SCAN = 4 << 20  # bytes looked at per step of the zero check: non-zero data stops it early


def aligned_empty(shape: Sequence[int], dtype: np.dtype, *, zeros: bool = False) -> np.ndarray:
    """An uninitialised C-ordered array whose data is ``ALIGN``-byte aligned.

    With ``zeros`` it is zero-filled (``calloc``: a large one gets fresh pages, touched later).
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = (np.zeros if zeros else np.empty)(n + ALIGN, np.uint8)
    off = (-buf.ctypes.data) % ALIGN
    return buf[off : off + n].view(dtype).reshape(tuple(shape))


def as_bytes(arr: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as a flat uint8 view (no copy)."""
    return arr.reshape(-1).view(np.uint8) if arr.size else np.empty(0, np.uint8)


class Zeros:
    """A piece known to be all zeros: what an async snapshot keeps instead of a copy."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: Sequence[int], dtype: np.dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def array(self) -> np.ndarray:
        return np.zeros(self.shape, self.dtype)


def is_zero(arr: np.ndarray) -> bool:
    """Whether every byte of the C-contiguous ``arr`` is zero (so ``-0.0`` and NaN are not).

    The first 64 bytes are looked at first, so that most non-zero data costs nothing; then the
    rest, ``ZERO_SCAN`` bytes at a time, as uint64 words (NumPy's ``max`` releases the GIL).
    """
    raw = as_bytes(arr)
    if raw[:64].any():
        return False
    for lo in range(64, raw.size, ZERO_SCAN):
        block = raw[lo : lo + ZERO_SCAN]
        n = block.size // 8 * 8
        if (n and block[:n].view(np.uint64).max()) or block[n:].any():
            return False
    return True
