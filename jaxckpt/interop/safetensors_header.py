"""The header of a safetensors file, parsed and validated: an 8-byte little-endian length,
then a JSON object naming each tensor's dtype, shape and ``data_offsets`` (relative to the
end of the header), checked against the file before any tensor is read."""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard

import ml_dtypes
import numpy as np

from jaxckpt.errors import CorruptCheckpointError
from jaxckpt.interop.safetensors_ranges import File, Tensor

MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers too
INDEX_SUFFIX = ".safetensors.index.json"

DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(t)
    for name, t in {
        "BOOL": np.bool_,
        "U8": np.uint8,
        "I8": np.int8,
        "U16": np.uint16,
        "I16": np.int16,
        "U32": np.uint32,
        "I32": np.int32,
        "U64": np.uint64,
        "I64": np.int64,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "F32": np.float32,
        "F64": np.float64,
        "C64": np.complex64,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
        "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
        "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
        "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    }.items()
}
_PACKED = ("F4", "F6_E2M3", "F6_E3M2")  # sub-byte types: several values per byte


def looks_like(head: bytes, path: str) -> bool:
    if path.endswith(INDEX_SUFFIX):
        return head[:1] == b"{"
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def corrupt(file: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"The safetensors file {file} is damaged or not a safetensors file: {what}. Fix: "
        "download or write it again."
    )


def read_header(file: File) -> tuple[dict[str, Any], list[tuple[str, Tensor]]]:
    """``(metadata, [(name, tensor), ...])`` of one file, in header order, validated: known
    dtypes, byte lengths that fit shape and dtype, offsets inside the file and no overlaps."""
    where = file.path
    head = file.read(0, 8)
    n = int.from_bytes(head, "little")
    size = file.size()
    if n > MAX_HEADER or (size >= 0 and 8 + n > size):
        raise corrupt(where, f"its header length {n} does not fit a file of {size} bytes")
    try:
        header = json.loads(file.read(8, 8 + n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(where, f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt(where, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    data_size = size - base if size >= 0 else None
    tensors = []
    for name, info in header.items():
        t = _tensor(file, where, name, info, base, data_size)
        tensors.append((name, t))
    spans = sorted((t.start, t.stop, name) for name, t in tensors if t.stop > t.start)
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise corrupt(where, f"the tensors {a!r} and {b!r} overlap")
    return metadata, tensors


def _tensor(
    file: File, where: str, name: str, info: Any, base: int, data_size: int | None
) -> Tensor:
    if not isinstance(info, dict):
        raise corrupt(where, f"the tensor {name!r} has no dtype, shape and data_offsets")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code in _PACKED:
        raise CorruptCheckpointError(
            f"The tensor {name!r} of {where} has the packed dtype {code}, which jaxckpt does "
            "not read. Fix: load it with the safetensors library and convert it to a dtype of "
            "a byte or more."
        )
    if code not in DTYPES:
        raise corrupt(where, f"the tensor {name!r} has the unknown dtype {code!r}")
    if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
        raise corrupt(where, f"the tensor {name!r} has a malformed shape or data_offsets")
    begin, end = offsets
    dtype = DTYPES[code]
    want = math.prod(shape) * dtype.itemsize
    if end < begin or (data_size is not None and end > data_size):
        raise corrupt(
            where, f"the tensor {name!r} has data_offsets {offsets} outside the data section"
        )
    if end - begin != want:
        raise corrupt(
            where,
            f"the tensor {name!r} ({code}{shape}) needs {want} bytes but data_offsets {offsets} "
            f"give {end - begin}",
        )
    return Tensor(file, name, dtype, tuple(shape), base + begin, base + end)


def _naturals(v: Any) -> TypeGuard[list[int]]:
    return isinstance(v, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v
    )
