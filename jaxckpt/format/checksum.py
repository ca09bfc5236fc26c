"""CRC-32C, the checksum every zarr chunk jaxckpt writes ends with (and each packed leaf's
record holds), taken without holding the GIL where that pays; and sealed JSON files (``COMMIT``,
a manager's index) that end with the checksum of their own bytes."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
from collections.abc import Callable

import google_crc32c
import numpy as np

GIL_FREE_CRC = 64 << 10  # bytes from which a checksum is taken without the GIL


def crc32c(raw: np.ndarray, crc: int = 0) -> int:
    """The CRC-32C of ``raw`` (uint8), extending ``crc``: what a chunk file ends with, and a
    packed leaf's record holds.

    ``google_crc32c`` holds the GIL over a NumPy buffer, so the I/O threads would checksum one
    at a time, however many cores the host has (docs/speed.md). Its C
    library called through ``ctypes`` runs without the GIL; small buffers, where the call's
    own cost dominates, stay with the extension.
    """
    if raw.size >= GIL_FREE_CRC and _crc32c_extend is not None and raw.flags.c_contiguous:
        return int(_crc32c_extend(crc, raw.ctypes.data, raw.size))
    return google_crc32c.extend(crc, raw) if raw.size else crc


def crc32c_bytes(data: bytes) -> int:
    """The CRC-32C of ``data``."""
    return crc32c(np.frombuffer(data, np.uint8))


_SEAL_KEY = b'"crc32c":'
_SEAL_END = re.compile(rb"\s*([0-9]{1,10})\s*}\s*")


def seal(body: bytes) -> bytes:
    """``body`` (the text of a JSON object) with a last member ``"crc32c"``: the CRC-32C of
    every byte before that member's key. An indented body keeps its style."""
    head = body[: body.rindex(b"}")].rstrip()
    head += b",\n " if b"\n" in body else b","
    space, end = (b" ", b"\n}") if b"\n" in body else (b"", b"}")
    return head + _SEAL_KEY + space + str(crc32c_bytes(head)).encode() + end


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` ends with a ``"crc32c"`` member that matches the bytes before it (what
    :func:`seal` wrote, undamaged)."""
    head, key, tail = data.rpartition(_SEAL_KEY)
    m = _SEAL_END.fullmatch(tail)
    return bool(key) and m is not None and int(m.group(1)) == crc32c_bytes(head)


def _find_crc32c_extend() -> Callable[[int, int, int], int] | None:
    """``crc32c_extend`` of the C library that ``google_crc32c`` ships (or the system's)."""
    libs = os.path.join(
        os.path.dirname(os.path.dirname(google_crc32c.__file__)), "google_crc32c.libs"
    )
    names = sorted(glob.glob(os.path.join(libs, "libcrc32c*.so*")))
    names.append(ctypes.util.find_library("crc32c") or "")
    for name in filter(None, names):
        try:
            fn = ctypes.CDLL(name).crc32c_extend
        except (AttributeError, OSError):
            continue
        fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        fn.restype = ctypes.c_uint32
        return fn
    return None


_crc32c_extend = _find_crc32c_extend()
