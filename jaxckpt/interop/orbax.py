"""Orbax checkpoints (orbax-checkpoint 0.12), read without orbax-checkpoint.

Layouts read: a PyTree item directory (``_METADATA`` beside the arrays: OCDBT or one zarr
array per leaf, zarr v2 or v3, written by one process or several), a step directory
(``_CHECKPOINT_METADATA`` beside its items: ``Composite`` items become the top-level keys, a
lone ``default`` item is the whole tree, a JSON item's values are leaves), named ``<N>`` or
``<prefix>_<N>``, locally or on ``s3://`` / ``gs://``.

The metadata is Orbax's own JSON, read directly: ``_METADATA`` (each leaf's keys and kind),
``array_metadatas/process_<i>`` (a typed PRNG key's implementation), ``_strings.json`` (string
leaves) and ``_CHECKPOINT_METADATA`` (time and metrics). The arrays are opened with
TensorStore's ``zarr``/``zarr3`` drivers over its ``ocdbt`` kvstore (or the directory itself,
without OCDBT), the drivers Orbax writes them with: a slice reads only the chunks it covers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.errors import CheckpointError, CorruptCheckpointError
from jaxckpt.interop.source import Index, Keys, Leaf

ITEM = "_METADATA"
STEP = "_CHECKPOINT_METADATA"
_STEP_NAME = re.compile(r"(?:.*_)?([0-9]+)")
_SEQ, _DICT = 1, 2  # Orbax's key types
# The value types Orbax records for the parts of a tree that hold no leaf, as jaxckpt's nodes.
_EMPTY = {"None": "none", "Dict": "dict", "List": "list", "Tuple": "tuple"}


def _read_json(root: str, key: str) -> Any:
    data = _storage.at(root).read(key)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as e:
        raise CorruptCheckpointError(
            f"{_storage.join(root, key)} is not valid JSON ({e}): the Orbax checkpoint's "
            "metadata is damaged. Fix: restore another step, or copy this one again."
        ) from None


def _is_item(path: str) -> bool:
    return _storage.at(path).exists(ITEM)


def recognise(path: str) -> bool:
    """An Orbax item directory (``_METADATA``) or step directory (``_CHECKPOINT_METADATA``)."""
    try:
        return _storage.at(path).exists(ITEM) or _storage.at(path).exists(STEP)
    except (OSError, CheckpointError):
        return False


def step_of(name: str) -> int | None:
    """The step of an Orbax step directory's name (``7``, ``checkpoint_7``, ``0007``)."""
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def steps(directory: str) -> dict[int, str]:
    """``{step: path}`` of the finished Orbax steps in a run's ``directory`` (Orbax writes a
    step's ``_CHECKPOINT_METADATA`` when it finalizes it; unfinished ones have a temporary
    name)."""
    out: dict[int, str] = {}
    for name in _storage.at(directory).names():
        step = step_of(name)
        if step is not None and not name.startswith("ckpt-"):
            path = _storage.join(directory, name)
            if _storage.at(path).exists(STEP):
                out.setdefault(step, path)
    return out


def step_metadata(path: str) -> dict[str, Any]:
    """``{"time": seconds, "metrics": {...}}`` from a step's ``_CHECKPOINT_METADATA``."""
    meta = _read_json(path, STEP)
    meta = meta if isinstance(meta, dict) else {}
    out: dict[str, Any] = {}
    t = meta.get("commit_timestamp_nsecs") or meta.get("init_timestamp_nsecs")
    if isinstance(t, (int, float)):
        out["time"] = t / 1e9
    metrics = meta.get("metrics")
    if isinstance(metrics, dict) and metrics:
        out["metrics"] = metrics
    return out


class _Item:
    """One PyTree item: its leaves and their TensorStore arrays."""

    def __init__(self, path: str, into: Keys):
        self.path = path
        meta = _read_json(path, ITEM)
        if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
            raise CorruptCheckpointError(
                f"{path}/{ITEM} holds no Orbax tree metadata: the checkpoint is damaged or was "
                "written by an Orbax older than 0.5. Fix: restore it with orbax-checkpoint and "
                "save it again, or restore another step."
            )
        self.ocdbt = bool(meta.get("use_ocdbt", _storage.at(path).exists("manifest.ocdbt")))
        self.driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        strings = _read_json(path, "_strings.json") if _has_strings(meta) else None
        impls = _key_impls(path)
        self.leaves: dict[Keys, Leaf] = {}
        self.nodes: dict[Keys, str] = {}  # None and empty containers: no data, in the tree
        self.names: dict[Keys, str] = {}
        arrays: dict[Keys, str] = {}
        order: list[Keys] = []
        for entry in meta["tree_metadata"].values():
            kms = entry.get("key_metadata") or []
            value = entry.get("value_metadata") or {}
            keys: Keys = tuple(
                int(k["key"]) if k.get("key_type") == _SEQ else str(k["key"]) for k in kms
            )
            name = ".".join(str(k["key"]) for k in kms)
            kind = value.get("value_type")
            if kind in _EMPTY:
                self.nodes[into + keys] = _EMPTY[kind]
                continue
            if value.get("skip_deserialize"):
                continue
            order.append(into + keys)
            if kind == "string":
                self.leaves[into + keys] = Leaf((), np.dtype(object), value=(strings or {})[name])
            elif kind in ("jax.Array", "np.ndarray", "scalar"):
                arrays[into + keys] = name
        self._stores = {k: self._open(n) for k, n in arrays.items()}
        for k, name in arrays.items():
            try:
                store = self._stores[k].result()
            except Exception as e:
                raise _error(path, name, e) from e
            self._stores[k] = store
            shape, dtype = tuple(store.shape), np.dtype(store.dtype.numpy_dtype)
            self.leaves[k] = Leaf(shape, dtype, key_impl=impls.get(name))
            self.names[k] = name
        self.leaves = {k: self.leaves[k] for k in order if k in self.leaves}  # _METADATA's order

    def _open(self, name: str) -> Any:
        if self.ocdbt:
            kv = {
                "driver": "ocdbt",
                "base": _storage.at(self.path).kvstore_spec(),
                "path": name + "/",
            }
        else:
            kv = _storage.at(_storage.join(self.path, name)).kvstore_spec()
        spec = {"driver": self.driver, "kvstore": kv, "open": True}
        return ts.open(spec, read=True, context=_runtime.context())


def _has_strings(meta: dict[str, Any]) -> bool:
    return any(
        (e.get("value_metadata") or {}).get("value_type") == "string"
        for e in meta["tree_metadata"].values()
    )


def _key_impls(path: str) -> dict[str, str]:
    """``{param name: PRNG key impl}`` from ``array_metadatas/process_<i>`` (every process's)."""
    out: dict[str, str] = {}
    for name in _storage.at(_storage.join(path, "array_metadatas")).names():
        doc = _read_json(path, f"array_metadatas/{name}") or {}
        for entry in doc.get("array_metadatas", []):
            m = entry.get("array_metadata") or {}
            impl = (m.get("ext_metadata") or {}).get("random_key_impl")
            param = m.get("param_name")
            if impl and isinstance(param, str):
                out[param] = impl
    return out


def _error(root: str, name: str, e: Exception) -> CheckpointError:
    return CorruptCheckpointError(
        f"The array {name!r} of the Orbax checkpoint {root} cannot be read ({e}). Fix: restore "
        "another step, or copy this one again in full."
    )


def _json_leaves(doc: Any, keys: Keys, out: dict[Keys, Leaf], nodes: dict[Keys, str]) -> None:
    if isinstance(doc, dict) and doc:
        for k, v in doc.items():
            _json_leaves(v, (*keys, str(k)), out, nodes)
    elif isinstance(doc, list) and doc:
        for i, v in enumerate(doc):
            _json_leaves(v, (*keys, i), out, nodes)
    elif isinstance(doc, (bool, int, float, str)):
        out[keys] = Leaf((), np.dtype(object), value=doc)
    elif keys:  # null, {} or []
        nodes[keys] = "none" if doc is None else "dict" if isinstance(doc, dict) else "list"


class OrbaxSource:
    """An Orbax step or item directory, as a :class:`~jaxckpt.interop.source.Source`."""

    format = "orbax"

    def __init__(self, path: str):
        self.path = path
        self._items: dict[Keys, _Item] = {}
        self._leaves: dict[Keys, Leaf] = {}
        self._nodes: dict[Keys, str] = {}
        self._meta = step_metadata(path) if _storage.at(path).exists(STEP) else {}
        if _is_item(path):
            self._add_item(path, ())
        else:
            names = [n for n in _storage.at(path).names() if n not in (STEP, "commit_success.txt")]
            whole = names == ["default"]
            for n in names:
                self._add_item(_storage.join(path, n), () if whole else (n,))
        base = path.rstrip("/").rsplit("/", 1)[-1]
        step = step_of(base)
        if step is None and not _storage.at(path).exists(
            STEP
        ):  # an item directory: its step directory's name
            parent = path.rstrip("/").rsplit("/", 1)[0]
            if _storage.at(parent).exists(STEP):
                step = step_of(parent.rsplit("/", 1)[-1])
        self.step = step

    def _add_item(self, path: str, into: Keys) -> None:
        if _is_item(path):
            item = _Item(path, into)
            for k in item.leaves:
                self._items[k] = item
            self._leaves.update(item.leaves)
            self._nodes.update(item.nodes)
            return
        doc = _read_json(path, "metadata")  # a JsonSave item
        if doc is not None:
            _json_leaves(doc, into, self._leaves, self._nodes)

    def metadata(self) -> dict[str, Any]:
        """Time and metrics, from ``_CHECKPOINT_METADATA``."""
        return dict(self._meta)

    def leaves(self) -> Mapping[Keys, Leaf]:
        return self._leaves

    def nodes(self) -> Mapping[Keys, str]:
        """None and empty containers in the saved tree (Orbax records them in ``_METADATA``)."""
        return self._nodes

    def read(self, keys: Keys, index: Index | None = None) -> np.ndarray:
        return self.read_many([(keys, index)])[0]

    def read_many(self, requests: Sequence[tuple[Keys, Any]]) -> list[np.ndarray]:
        """Many reads issued together: TensorStore reads only the chunks each slice covers."""
        futures = []
        for keys, index in requests:
            store = self._items[keys]._stores[keys]
            futures.append(store[index].read() if index is not None else store.read())
        out = []
        for (keys, _), f in zip(requests, futures, strict=True):
            try:
                out.append(f.result())
            except Exception as e:
                item = self._items[keys]
                raise _error(item.path, item.names[keys], e) from e
        return out

    def close(self) -> None:
        self._items.clear()


def open(path: str) -> OrbaxSource:  # noqa: A001 - every reader module names it open
    return OrbaxSource(path)
