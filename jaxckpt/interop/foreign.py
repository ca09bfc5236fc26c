"""A foreign checkpoint read as a jaxckpt one: :class:`ForeignReader` serves a
:class:`~jaxckpt.interop.source.Source` through the interface of :class:`jaxckpt.Reader`.

The leaves get the paths a jaxckpt checkpoint of the same tree has (edge names of
:mod:`jaxckpt.format.paths`): a ``str`` key is a dict key, an ``int`` a sequence index. Formats that
keep every key as a string (Orbax, Flax msgpack) cannot tell an ``int`` dict key (``~i0`` in
jaxckpt, e.g. the layers of an ``nnx.Sequential``) from the string ``"0"``: a lookup of a path
with ``~i<n>`` edges that the checkpoint lacks finds the leaf named ``<n>`` there instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from jaxckpt import runtime as _runtime
from jaxckpt import storage
from jaxckpt.checkpoint.reader import LeafMapping, _checked_index
from jaxckpt.errors import CheckpointNotFoundError
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format import run as _run
from jaxckpt.format.metadata import Record
from jaxckpt.interop.source import Keys, Leaf, Source

PyTree = Any
_INT_EDGE = re.compile(r"(^|/)~i(-?[0-9]+)(?=/|$)")
NAMES = {"orbax": "Orbax", "flax-msgpack": "Flax msgpack", "safetensors": "safetensors"}


def name_of(keys: Keys) -> str:
    """The jaxckpt path of a source's keys (``("params", "layers", 0)`` -> ``params/layers/0``)."""
    return "/".join(_edge(k)[1] for k in keys)


def _edge(key: str | int) -> tuple[str, str]:
    if isinstance(key, int):
        return _paths.SEQ, str(key)
    return _paths.DICT, _paths.escape(key)


def _key_fields(leaf: Leaf, impl: str) -> Record:
    """What a typed key (of implementation ``impl``) adds to its array record, as jaxckpt
    records it."""
    import jax

    data = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    keys = jax.eval_shape(lambda d: jax.random.wrap_key_data(d, impl=impl), data)
    return {"key": impl, "key_dtype": str(keys.dtype), "key_shape": list(keys.shape)}


def record_of(leaf: Leaf, where: str) -> Record:
    """The jaxckpt leaf record (see docs/format.md) describing a source's leaf."""
    if leaf.value is not None:
        if isinstance(leaf.value, (np.ndarray, np.generic)):
            arr = np.asarray(leaf.value)
            return {"t": "array", "shape": list(arr.shape), "dtype": arr.dtype.name}
        return _metadata.value_record(leaf.value, where)
    rec: Record = {"t": "array", "shape": list(leaf.shape), "dtype": leaf.dtype.name}
    if leaf.key_impl is not None:
        rec.update(_key_fields(leaf, leaf.key_impl))
    return rec


class ForeignReader(LeafMapping):
    """A foreign checkpoint (``source``) read through :class:`jaxckpt.Reader`'s interface:
    ``paths``, ``records``, ``read``, ``read_many``, ``tree``... Array data is read only when
    asked for, through ``source.read`` (which reads only the slice asked for)."""

    def __init__(self, source: Source):
        self.source = source
        self.path = source.path
        self.format = source.format
        self.commit = None  # no checksums: `jaxckpt verify` refuses a foreign checkpoint
        leaves = source.leaves()
        self._keys: dict[str, Keys] = {}
        self._leaves: dict[str, Leaf] = {}
        self._records: dict[str, Record] = {}
        root: Record = {"t": "dict", "c": []}
        for keys, leaf in leaves.items():
            path = name_of(keys)
            self._keys[path] = keys
            self._leaves[path] = leaf
            rec = record_of(leaf, path or "<root>")
            self._records[path] = rec
            _insert(root, keys, rec)
        nodes = getattr(source, "nodes", None)
        for keys, kind in (nodes() if callable(nodes) else {}).items():
            _insert(root, keys, {"t": kind, "c": []})
        _settle(root)
        self._root = root
        extra = getattr(source, "metadata", None)
        self.metadata: dict[str, Any] = {
            **(extra() if callable(extra) else {}),
            "step": source.step,
            "format": source.format,
        }

    # ------------------------------------------------------------------ what Reader offers

    @property
    def records(self) -> dict[str, Record]:
        return self._records

    @property
    def structure(self) -> Record:
        return self._root

    def close(self) -> None:
        self.source.close()

    def resolve(self, path: str) -> str:
        """The saved path a looked-up ``path`` stands for (``~i<n>`` edges may be ``<n>``)."""
        if path in self._records or "~i" not in path:
            return path
        return _INT_EDGE.sub(r"\1\2", path)

    def find(self, path: str) -> Record | None:
        if not isinstance(path, str):
            return None
        return self._records.get(self.resolve(path))

    def node(self, path: str) -> Record | None:
        node: Record | None = self._root
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            kids = {_paths.name_of(k, key): c for k, key, c in (node or {}).get("c", [])}
            node = kids.get(part)
            if node is None:
                alt = self.resolve("/".join(parts[: i + 1])).split("/")[-1]
                node = kids.get(alt)
            if node is None:
                return None
        return node

    def leaves(self, prefix: str = "") -> dict[str, Record]:
        base = self.resolve("/".join(p for p in prefix.split("/") if p))
        if not base:
            return self._records
        return {p: r for p, r in self._records.items() if p == base or p.startswith(base + "/")}

    def keystr(self, path: str) -> str:
        keys = self._keys.get(self.resolve(path))
        if keys is None:
            return path
        return _paths.keystr([_paths.key_of(_edge(k)[0], k) for k in keys])

    def record(self, path: str) -> Record:
        rec = self.find(path)
        if rec is None:
            raise KeyError(
                f"{path!r} is not a leaf of the {NAMES.get(self.format, self.format)} checkpoint "
                f"{self.path}. Its leaves are listed by reader.paths (or `jaxckpt inspect`)."
            )
        return rec

    def variables(self) -> list[tuple[str, tuple[int, ...], str]]:
        out = []
        for p, rec in self._records.items():
            if rec["t"] == "array":
                out.append(
                    (
                        p,
                        tuple(rec.get("key_shape", rec["shape"])),
                        rec.get("key_dtype", rec["dtype"]),
                    )
                )
            else:
                out.append((p, (), rec["py"]))
        return sorted(out)

    def read(self, path: str, index: Any = None) -> Any:
        rec = self.record(path)
        if rec["t"] != "array":
            return _metadata.load_value(rec)
        return self.read_many([(path, index)])[0]

    def read_many(
        self,
        requests: Sequence[tuple[str, Any]],
        then: Callable[[int, np.ndarray], Any] | None = None,
    ) -> list[Any]:
        """Reads many array slices, all issued together (the source's ``read_many`` where it
        has one, else its ``read`` on the I/O threads)."""
        todo = []
        for p, index in requests:
            rec = self.record(p)
            if index is not None:
                index = _checked_index(self.path, p, rec["shape"], index)
            todo.append((self.resolve(p), index))
        many = getattr(self.source, "read_many", None)
        if not todo:
            return []
        if many is not None:
            got = many([(self._keys[p], i) for p, i in todo])
            return got if then is None else [then(i, a) for i, a in enumerate(got)]
        if then is None:
            return list(_runtime.pool("read").map(self._read_one, *zip(*todo, strict=True)))
        # ``then`` (a restore's device put) runs on the I/O thread that read the array, as
        # the next reads go on.
        return list(
            _runtime.pool("read").map(
                lambda i, p, index: then(i, self._read_one(p, index)),
                range(len(todo)),
                *zip(*todo, strict=True),
            )
        )

    def _read_one(self, path: str, index: Any) -> np.ndarray:
        leaf = self._leaves[path]
        if leaf.value is not None:
            arr = np.asarray(leaf.value)
            return arr if index is None else arr[index]
        return self.source.read(self._keys[path], index)

    def tree(self, prefix: str | None = None) -> PyTree:
        """Every leaf (under ``prefix``), in dicts and lists of NumPy arrays; typed keys come
        back as typed key arrays."""
        base = "/".join(p for p in (prefix or "").split("/") if p)
        node = self.node(base)
        if node is None:
            raise KeyError(f"prefix {prefix!r} is not a path in the checkpoint {self.path}")
        base = self.resolve(base)
        leaves = self.leaves(base)
        arrays = [p for p, r in leaves.items() if r["t"] == "array"]
        values = dict(zip(arrays, self.read_many([(p, None) for p in arrays]), strict=True))

        def leaf(path: str, rec: Record) -> Any:
            if rec["t"] != "array":
                return _metadata.load_value(rec)
            arr = values[f"{base}/{path}" if base and path else (base or path)]
            if "key" in rec:
                return _metadata.load_key(rec, arr)
            return arr[()] if rec.get("np_scalar") else arr

        return _metadata.rebuild(node, leaf)


def _insert(root: Record, keys: Keys, rec: Record) -> None:
    node = cast(dict[str, Any], root)  # with its lookup table "_by" while it is built
    for i, key in enumerate(keys):
        kind, _ = _edge(key)
        kids = node.setdefault("_by", {})
        if key not in kids:
            child = rec if i == len(keys) - 1 else {"t": "dict", "c": []}
            node["c"].append([kind, key, child])
            kids[key] = child
        node = kids[key]
    if not keys:  # a checkpoint holding one leaf as its whole tree
        whole = cast(dict[str, Any], root)
        whole.clear()
        whole.update(rec)


def _settle(node: Record) -> None:
    """Drops the lookup tables :func:`_insert` kept, and makes a node whose children are all
    sequence indices 0..n-1 a list."""
    cast(dict[str, Any], node).pop("_by", None)
    if node["t"] in _metadata.LEAF_KINDS:
        return
    kids = node["c"]
    if kids and all(k == _paths.SEQ for k, _, _ in kids):
        kids.sort(key=lambda c: c[1])
        if [c[1] for c in kids] == list(range(len(kids))):
            node["t"] = "list"
    for _, _, child in kids:
        _settle(child)


# ---------------------------------------------------------------------------- verify

VERIFIED = (
    "every array read and decoded ({} checkpoints hold no checksums: damage that still "
    "decodes cannot be found)"
)


def verify(reader: ForeignReader, progress: Any) -> Any:
    """``jaxckpt verify`` of a foreign checkpoint: every array read (a chunk that does not
    decode, a missing file, is damage); the formats keep no checksums to check."""
    from jaxckpt.tools.scan import VerifyReport

    arrays = {p: r for p, r in reader.records.items() if r["t"] == "array"}
    progress.total = sum(
        int(np.prod(r["shape"])) * np.dtype(r["dtype"]).itemsize for r in arrays.values()
    )
    damaged: dict[str, str] = {}
    done = 0
    for p, rec in arrays.items():
        try:
            reader.read_many([(p, None)])
        except Exception as e:
            damaged[p] = str(e)
        done += int(np.prod(rec["shape"])) * np.dtype(rec["dtype"]).itemsize
        progress.update(done)
    progress.close(done)
    return VerifyReport(len(arrays), progress.total, damaged)


# ---------------------------------------------------------------------------- recognition


def _recognisers() -> list[Any]:
    """The modules that recognise and open a format, each with ``recognise(path) -> bool``
    and ``open(path) -> Source``: tried in order."""
    from jaxckpt.interop import flax_msgpack, orbax, safetensors

    return [safetensors, orbax, flax_msgpack]


def open_source(path: str | os.PathLike[str]) -> Source | None:
    """The foreign checkpoint at ``path`` opened as a :class:`Source`, recognised by its
    content (not its name); None when no reader recognises it. A checkpoint of a format
    jaxckpt cannot read (a torch ``.pt`` file...) raises an error saying what it is."""
    from jaxckpt.interop import unreadable

    where = storage.normalize(path)
    unreadable.check(where)  # first: a file's magic bytes can also start a msgpack map
    for mod in _recognisers():
        if mod.recognise(where):
            return mod.open(where)  # type: ignore[no-any-return]
    steps = run_steps(where)
    if steps:
        newest = steps[max(steps)]
        raise CheckpointNotFoundError(
            f"{where} is the directory of an Orbax run ({len(steps)} steps, the newest "
            f"{newest}), not one checkpoint. Fix: restore one step, e.g. jc.restore({newest!r}, "
            f"target), or jc.CheckpointManager({where!r}).restore(target) for the newest."
        )
    return None


def run_steps(directory: str) -> dict[int, str]:
    """``{step: path}`` of the steps another library (Orbax) wrote in a run's directory."""
    from jaxckpt.interop import orbax

    return orbax.steps(directory)


def run_entry(step: int, path: str) -> _run.Entry:
    """What a manager shows of a foreign step: its time and numeric metrics."""
    from jaxckpt.interop import orbax

    meta = orbax.step_metadata(path)
    metrics = {k: v for k, v in meta.get("metrics", {}).items() if isinstance(v, (int, float))}
    return _run.Entry(step, float(meta.get("time", 0.0)), metrics)


def open_reader(path: str | os.PathLike[str]) -> ForeignReader | None:
    """:func:`open_source` served as a reader, or None."""
    source = open_source(path)
    return None if source is None else ForeignReader(source)
