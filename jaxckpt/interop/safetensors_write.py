"""Writing safetensors files with the library's own layout, one tensor at a time.

The layout is the ``safetensors`` library's (its ``prepare``): tensors sorted by descending
dtype alignment, then by name; the header JSON compact, ``__metadata__`` first, then each
tensor in data order, padded with spaces to a multiple of 8 bytes so that the data starts
8-byte aligned. A file written here is byte for byte the one ``safetensors.numpy.save_file``
writes for the same tensors; unlike it, the tensors are read one at a time as they are written,
so a model larger than memory converts.

A sharded set is as Hugging Face writes one (``huggingface_hub``'s shard split): tensors in
order, a new shard when the next one would pass ``max_shard_size``, a tensor larger than that on
its own; files ``model-00001-of-00003.safetensors`` beside ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxckpt.interop.safetensors_header import DTYPES, INDEX_SUFFIX

# The library's dtype order (its Dtype enum): the data of higher ones comes first.
_ORDER = (
    "BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ I16 U16 F16 BF16 "
    "I32 U32 F32 C64 F64 I64 U64"
).split()
_CODE = {dtype: code for code, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor to write: ``get()`` returns its array when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    get: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def code_of(dtype: np.dtype[Any]) -> str | None:
    """The safetensors dtype code of a NumPy dtype, None if the format has none."""
    return _CODE.get(np.dtype(dtype))


def _header(tensors: list[Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[Tensor]]:
    ordered = sorted(tensors, key=lambda t: (-_ORDER.index(_CODE[t.dtype]), t.name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in ordered:
        header[t.name] = {
            "dtype": _CODE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, ordered


def write_file(path: str, tensors: list[Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes one safetensors file atomically (a temporary sibling, renamed when complete)."""
    head, ordered = _header(tensors, metadata)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for t in ordered:
                arr = np.asarray(t.get(), order="C")  # ascontiguousarray makes 0-d 1-d
                if arr.shape != t.shape or arr.dtype != t.dtype:
                    raise ValueError(
                        f"The tensor {t.name!r} read as {arr.dtype}{list(arr.shape)}, not the "
                        f"{t.dtype}{list(t.shape)} its source lists."
                    )
                f.write(arr.reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def shards(tensors: list[Tensor], most: int) -> list[list[Tensor]]:
    """``tensors`` split as ``huggingface_hub`` splits a state dict into shards of ``most``
    bytes at most (a larger tensor alone in its shard)."""
    out: list[list[Tensor]] = []
    current: list[Tensor] = []
    size = 0
    for t in tensors:
        if t.nbytes > most:
            out.append([t])
            continue
        if current and size + t.nbytes > most:
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        out.append(current)
    return out


def write(dst: str, tensors: list[Tensor], max_shard_size: int | None = None) -> str:
    """Writes ``tensors`` to the file ``dst`` (``.../model.safetensors``), or, when they pass
    ``max_shard_size``, to shards beside it named from its stem and the index
    ``dst + ".index.json"``; returns what was written that reads them all (file or index)."""
    groups = shards(tensors, max_shard_size) if max_shard_size else [tensors]
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    if len(groups) <= 1:
        write_file(dst, tensors)
        return dst
    folder, name = os.path.split(dst)
    stem = name[: -len(".safetensors")]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_file(os.path.join(folder, file), group)
        weight_map.update({t.name: file for t in group})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    path = os.path.join(folder, stem + INDEX_SUFFIX)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(path + ".tmp", path)
    return path


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """Bytes of ``5000000``, ``"5GB"`` (10**9, as Hugging Face counts) or ``"4GiB"`` (2**30)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or not float(m.group(1)) or m.group(2) not in _UNITS:
        raise ValueError(
            f"max_shard_size must be a positive number of bytes or a size such as '5GB' or "
            f"'500MiB', not {size!r}. Fix: e.g. max_shard_size='5GB'."
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])
