"""Reading safetensors files: one file, or a sharded set through its ``*.safetensors.index.json``.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets`` (relative to the end of the header), then the tensors' bytes.
The header is read once; a tensor, or rows of one, is then read with one positioned read of
exactly its bytes (``os.preadv`` into the array's own buffer, so nothing is copied). That is why
this module reads the bytes itself rather than through ``safetensors.safe_open``: the library
has no way to read only the rows a process needs on object stores, and on ``s3://``/``gs://``
the same byte ranges are read through TensorStore's kvstore.

Names are split on ``"."`` into dict keys (``bert.encoder.layer.0.attention.self.query.kernel``
becomes ``("bert", "encoder", "layer", "0", ...)``), so a Flax tree of the same model matches;
every key is a ``str``, digits included (``"0"`` matches a list index of the target, whose
jaxckpt path is ``0`` too). ``split=False`` keeps each name whole as one key.
"""

from __future__ import annotations

import builtins
import json
import math
import operator
import os
from collections.abc import Mapping
from typing import Any, TypeGuard

import ml_dtypes
import numpy as np

from jaxckpt import memory as _memory
from jaxckpt import storage as _storage
from jaxckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, StructureMismatchError
from jaxckpt.interop.source import Index, Keys, Leaf

FORMAT = "safetensors"
MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers too
INDEX_SUFFIX = ".safetensors.index.json"
# Reads of a slice are runs of at least this many bytes where they can be (smaller ones are
# widened): a positioned read of a local file costs about as much as a few KiB of copying, a
# request to an object store as much as about a MiB of transfer.
MIN_RUN = 4096
MIN_RUN_URL = 1 << 20

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


def _is_url(path: str) -> bool:
    """Whether ``path`` is on a store without files (an object store): read in byte ranges."""
    return _storage.at(path).os_path() is None


def recognise(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file, an index of shards, or a directory holding
    ``model.safetensors`` or an index; judged by content (the header), not by name alone."""
    path = os.fspath(path)
    if _is_url(path):
        if not path.endswith((".safetensors", INDEX_SUFFIX)):
            return False
        try:
            head = _Bytes(path).read(0, 9)
        except Exception:  # noqa: BLE001 - unreachable or absent: not recognised
            return False
        return _looks_like(head, path)
    if os.path.isdir(path):
        return _main_file(path) is not None
    if not os.path.isfile(path):
        return False
    try:
        with builtins.open(path, "rb", buffering=0) as f:
            head = f.read(9)
    except OSError:
        return False
    return _looks_like(head, path)


def _looks_like(head: bytes, path: str) -> bool:
    if path.endswith(INDEX_SUFFIX):
        return head[:1] == b"{"
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def _main_file(directory: str) -> str | None:
    """The index (preferred) or ``model.safetensors`` in a directory, as Hugging Face lays
    out a model; None if neither is there."""
    names = set(os.listdir(directory))
    indexes = sorted(n for n in names if n.endswith(INDEX_SUFFIX))
    if "model" + INDEX_SUFFIX in names:
        return os.path.join(directory, "model" + INDEX_SUFFIX)
    if len(indexes) == 1:
        return os.path.join(directory, indexes[0])
    if "model.safetensors" in names:
        return os.path.join(directory, "model.safetensors")
    return None


def open(path: str | os.PathLike[str], *, split: bool = True) -> SafetensorsSource:  # noqa: A001
    """Opens a safetensors file, a sharded set (its index) or a model directory for reading."""
    return SafetensorsSource(os.fspath(path), split=split)


class _Bytes:
    """Positioned reads of one file: local (``os.preadv``) or on an object store (TensorStore
    kvstore byte ranges)."""

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._kv: Any = None
        if _is_url(path):
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


class _Tensor:
    __slots__ = ("file", "name", "dtype", "shape", "start", "stop")

    def __init__(
        self, file: _Bytes, name: str, dtype: np.dtype, shape: tuple, start: int, stop: int
    ):
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape
        self.start, self.stop = start, stop


def _corrupt(file: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"The safetensors file {file} is damaged or not a safetensors file: {what}. Fix: "
        "download or write it again."
    )


def read_header(file: _Bytes) -> tuple[dict[str, Any], list[tuple[str, _Tensor]]]:
    """``(metadata, [(name, tensor), ...])`` of one file, in header order, validated: known
    dtypes, byte lengths that fit shape and dtype, offsets inside the file and no overlaps."""
    where = file.path
    head = file.read(0, 8)
    n = int.from_bytes(head, "little")
    size = file.size()
    if n > MAX_HEADER or (size >= 0 and 8 + n > size):
        raise _corrupt(where, f"its header length {n} does not fit a file of {size} bytes")
    try:
        header = json.loads(file.read(8, 8 + n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(where, f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(where, "its header is not a JSON object")
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
            raise _corrupt(where, f"the tensors {a!r} and {b!r} overlap")
    return metadata, tensors


def _tensor(
    file: _Bytes, where: str, name: str, info: Any, base: int, data_size: int | None
) -> _Tensor:
    if not isinstance(info, dict):
        raise _corrupt(where, f"the tensor {name!r} has no dtype, shape and data_offsets")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code in _PACKED:
        raise CorruptCheckpointError(
            f"The tensor {name!r} of {where} has the packed dtype {code}, which jaxckpt does "
            "not read. Fix: load it with the safetensors library and convert it to a dtype of "
            "a byte or more."
        )
    if code not in DTYPES:
        raise _corrupt(where, f"the tensor {name!r} has the unknown dtype {code!r}")
    if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
        raise _corrupt(where, f"the tensor {name!r} has a malformed shape or data_offsets")
    begin, end = offsets
    dtype = DTYPES[code]
    want = math.prod(shape) * dtype.itemsize
    if end < begin or (data_size is not None and end > data_size):
        raise _corrupt(
            where, f"the tensor {name!r} has data_offsets {offsets} outside the data section"
        )
    if end - begin != want:
        raise _corrupt(
            where,
            f"the tensor {name!r} ({code}{shape}) needs {want} bytes but data_offsets {offsets} "
            f"give {end - begin}",
        )
    return _Tensor(file, name, dtype, tuple(shape), base + begin, base + end)


def _naturals(v: Any) -> TypeGuard[list[int]]:
    return isinstance(v, list) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v
    )


class SafetensorsSource:
    """A safetensors file or sharded set, opened: its leaves, read on demand."""

    format = FORMAT
    step = None

    def __init__(self, path: str, *, split: bool = True):
        self.path = path
        if not _is_url(path) and os.path.isdir(path):
            main = _main_file(path)
            if main is None:
                raise CheckpointNotFoundError(
                    f"The directory {path} holds neither model.safetensors nor a "
                    f"*{INDEX_SUFFIX}. Fix: give the path of a .safetensors file or of the index."
                )
            path = main
        self.files: list[_Bytes] = []
        self.metadata: dict[str, Any] = {}
        try:
            named = self._index(path) if path.endswith(INDEX_SUFFIX) else self._file(path)
        except BaseException:
            self.close()
            raise
        self._leaves: dict[Keys, Leaf] = {}
        self._tensors: dict[Keys, _Tensor] = {}
        for name, t in named:
            keys = _split(name, path) if split else (name,)
            self._tensors[keys] = t
            self._leaves[keys] = Leaf(t.shape, t.dtype)
        if split:
            _check_tree(list(self._tensors), path)

    def _file(self, path: str) -> list[tuple[str, _Tensor]]:
        file = _Bytes(path)
        self.files.append(file)
        self.metadata, tensors = read_header(file)
        return tensors

    def _index(self, path: str) -> list[tuple[str, _Tensor]]:
        file = _Bytes(path)
        try:
            size = file.size()
            raw = file.read(0, size) if size >= 0 else file._kv.read(file._name).result().value
        finally:
            file.close()
        try:
            index = json.loads(raw)
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise _corrupt(path, 'its index is not JSON with a "weight_map"') from None
        self.metadata = dict(index.get("metadata") or {})
        folder = path.rsplit("/", 1)[0] if "/" in path else "."
        shards: dict[str, dict[str, _Tensor]] = {}
        for name in weight_map.values():
            if name not in shards:
                f = _Bytes(f"{folder}/{name}")
                self.files.append(f)
                shards[name] = dict(read_header(f)[1])
        out = []
        for name in sorted(weight_map, key=lambda k: (list(shards).index(weight_map[k]), k)):
            tensor = shards[weight_map[name]].get(name)
            if tensor is None:
                raise _corrupt(
                    f"{folder}/{weight_map[name]}",
                    f"the tensor {name!r} its index {path} names is not in it",
                )
            out.append((name, tensor))
        return out

    def leaves(self) -> Mapping[Keys, Leaf]:
        return self._leaves

    def read(self, keys: Keys, index: Index | None = None) -> np.ndarray:
        t = self._tensors[tuple(keys)]
        if index is None or not t.shape or not index:
            return t.file.read_into(_memory.aligned_empty(t.shape, t.dtype), t.start)
        return _read_box(t, index)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_box(t: _Tensor, index: Index) -> np.ndarray:
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
    least = MIN_RUN_URL if _is_url(t.file.path) else MIN_RUN
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


def _split(name: str, where: str) -> Keys:
    keys = tuple(name.split("."))
    if "" in keys:
        raise StructureMismatchError(
            f"The tensor name {name!r} in {where} has an empty part between dots, so it does "
            "not split into a tree path. Fix: open it with split=False to keep names whole."
        )
    return keys


def _check_tree(paths: list[Keys], where: str) -> None:
    """Names split on dots form a tree: no name is also the start of another."""
    ordered = sorted(paths)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b[: len(a)] == a:
            raise StructureMismatchError(
                f"The tensor {'.'.join(map(str, a))!r} in {where} is also the start of "
                f"{'.'.join(map(str, b))!r}, so split on dots they do not form a tree. Fix: open it "
                "with split=False to keep names whole."
            )
