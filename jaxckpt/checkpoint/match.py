"""Matching a target tree against a checkpoint: ``jc.match``, and the plan a restore follows.

Each target leaf is paired with the saved record at its checkpoint path (after ``prefix`` and
``rename``); what is missing, unused or mismatched is collected into a :class:`MatchStatus`,
whose message names every such leaf by its key path, with the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxckpt.checkpoint.reader import Reader, open_reader
from jaxckpt.checkpoint.target_paths import Prefix, Rename, _prefix_of, _renamer
from jaxckpt.errors import StructureMismatchError
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format import validate as _validate
from jaxckpt.format.metadata import Record
from jaxckpt.log import phase

PyTree = Any

_LIMIT = 20  # paths listed per section of a mismatch message
_FIX_MISSING = (
    '  Fix: pass missing="keep" to keep the target\'s own value for these (e.g. a fresh head '
    "on a pretrained backbone), or map them to saved paths with prefix= or rename= "
    "(jc.list_variables(path) lists the saved paths)."
)
_FIX_MISMATCHED = (
    '  Fix: pass mismatched="keep" to keep the target\'s own value for these (e.g. a new head '
    "with another number of classes on a pretrained backbone); or build the target with the "
    "saved shapes (the same model config), and dtypes the saved ones cast to safely (bool -> "
    "int -> float -> complex; float32 -> bfloat16 is fine, float -> int is not)."
)
_FIX_UNUSED = (
    "  Fix: pass partial=True to restore only the leaves the target asks for (the others "
    "are not read), or add these leaves to the target."
)


@dataclasses.dataclass(frozen=True)
class Mismatch:
    path: str  # the checkpoint path
    where: str  # the target key path, keystr form
    expected: str  # what the target asks for
    found: str  # what the checkpoint holds

    def __str__(self) -> str:
        return f"{self.where}: the target expects {self.expected}, the checkpoint has {self.found}"


@dataclasses.dataclass
class MatchStatus:
    """How a target matches a checkpoint, found from the metadata alone.

    ``missing``: target leaves the checkpoint lacks (checkpoint paths); ``unused``: saved
    leaves the target does not ask for; ``mismatched``: leaves in both whose shape or dtype
    the target cannot take.
    """

    path: str
    missing: list[str]
    unused: list[str]
    mismatched: list[Mismatch]
    # The key paths shown in messages, computed only for the paths listed: target key paths
    # of the missing leaves, and the saved key path of a checkpoint path.
    _target: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    _saved: Callable[[str], str] | None = dataclasses.field(default=None, repr=False, compare=False)

    def assert_existing_objects_matched(self) -> MatchStatus:
        """Every leaf of the target was found in the checkpoint with a compatible shape/dtype."""
        if self.missing or self.mismatched:
            raise StructureMismatchError(self.message(unused=False))
        return self

    def assert_consumed(self) -> MatchStatus:
        """As above, and every saved leaf was used by the target."""
        if self.missing or self.mismatched or self.unused:
            raise StructureMismatchError(self.message())
        return self

    def message(self, *, missing: bool = True, unused: bool = True) -> str:
        """The differences as the error a restore raises for them: the leaves the checkpoint
        lacks (with ``missing``), those the target does not ask for (with ``unused``) and
        those whose shape or dtype the target cannot take, each by key path, then the fix."""
        lines = [f"The checkpoint at {self.path} does not match the target."]
        if missing and self.missing:
            lines.append(f"  Target leaves the checkpoint lacks ({len(self.missing)}):")
            lines += _listed(
                self.missing, lambda p: f"    {self._target_where(p)}  (looked for {p!r})"
            )
            lines.append(_FIX_MISSING)
        if self.mismatched:
            lines.append(
                f"  Leaves whose shape or dtype the target cannot take ({len(self.mismatched)}):"
            )
            lines += _listed(self.mismatched, lambda m: f"    {m}")
            lines.append(_FIX_MISMATCHED)
        if unused and self.unused:
            saved = self._saved or (lambda p: p)
            lines.append(f"  Saved leaves the target lacks ({len(self.unused)}):")
            lines += _listed(self.unused, lambda p: f"    {saved(p)}  (saved as {p!r})")
            lines.append(_FIX_UNUSED)
        return "\n".join(lines)

    def _target_where(self, p: str) -> str:
        keypath = self._target.get(p)
        return p if keypath is None else _paths.keystr(keypath)


def _listed(items: list[Any], line: Callable[[Any], str]) -> list[str]:
    if len(items) <= _LIMIT:
        return [line(x) for x in items]
    return [*map(line, items[:_LIMIT]), f"    ... and {len(items) - _LIMIT} more"]


def leaf_kind(x: Any) -> str:
    if _metadata.is_stateful(x):
        return "state"
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
        return "array"
    if isinstance(x, (bool, int, float, complex)):
        return "scalar"
    if isinstance(x, (str, bytes)):
        return "text"
    return "any"


def _describe(rec: Record) -> str:
    if rec["t"] == "array":
        return f"{rec.get('key_dtype', rec['dtype'])}{list(rec.get('key_shape', rec['shape']))}"
    return "saved iterator/object state" if rec["t"] == "state" else f"a Python {rec['py']}"


def _same_array(x: Any, rec: Record) -> bool:
    """Whether the target leaf ``x`` is an array of the very shape and dtype of the saved
    array ``rec`` (not a typed key): the common case, told apart with little Python."""
    if rec["t"] != "array" or "key" in rec:
        return False
    array = _ARRAY_TYPES.get(type(x))
    if array is None:
        array = _ARRAY_TYPES[type(x)] = issubclass(type(x), _ARRAYS)
    if not array:
        return False
    return x.dtype == _validate.dtype_named(rec["dtype"]) and list(x.shape) == rec["shape"]


_ARRAYS = (jax.Array, jax.ShapeDtypeStruct, np.ndarray)
_ARRAY_TYPES: dict[
    type, bool
] = {}  # types found to be arrays or not (isinstance of jax.Array is slow)


def _problem(x: Any, rec: Record) -> str | None:
    """What the target leaf ``x`` expects, if it cannot take the saved leaf ``rec``; else None."""
    if _same_array(x, rec):
        return None
    kind = leaf_kind(x)
    if kind == "state":
        return None if rec["t"] == "state" else "an object with get_state()/set_state()"
    if kind == "text":
        ok = rec["t"] == "value" and rec["py"] == type(x).__name__
        return None if ok else f"a Python {type(x).__name__}"
    if kind == "any":
        return None
    if "key" in rec or _metadata.is_key(x):  # typed PRNG keys take only the same key type
        if kind != "array":
            return f"a Python {type(x).__name__}"
        expected = f"{x.dtype}{list(np.shape(x))}"
        same = str(x.dtype) == rec.get("key_dtype") and list(np.shape(x)) == rec.get("key_shape")
        if not same and "key" not in rec and _metadata.is_key(x):
            _, data = _key_data_of(tuple(np.shape(x)), x.dtype)
            expected += f" (key data {data.dtype.name}{list(data.shape)})"
        return None if same else expected
    if kind == "array":
        shape, dtype = tuple(np.shape(x)), np.dtype(x.dtype)
        expected = f"{dtype.name}{list(shape)}"
    else:
        shape, dtype = (), np.dtype(type(x))
        expected = f"a Python {type(x).__name__}"
    if rec["t"] == "value" and rec["py"] in ("bool", "int", "float", "complex") and shape == ():
        src = np.dtype(rec["py"] if rec["py"] != "float" else "float64")
    elif rec["t"] == "array":
        src = np.dtype(rec["dtype"])
        if tuple(rec["shape"]) != shape:
            return expected
    else:
        return expected
    if not _castable(src, dtype):
        return expected + f" (no safe cast from {src.name})"
    return None


def _as_key(x: Any, rec: Record) -> Record:
    """``rec``, made the record of a typed key of ``x``'s implementation where ``x`` is a
    typed-key target leaf and ``rec`` a plain array of exactly its key data (formats with no
    key type, Flax msgpack and safetensors, hold keys so): the restore wraps the data."""
    if rec["t"] != "array" or "key" in rec or not _metadata.is_key(x):
        return rec
    shape = tuple(np.shape(x))
    impl, data = _key_data_of(shape, x.dtype)
    if list(data.shape) != rec["shape"] or data.dtype != np.dtype(rec["dtype"]):
        return rec
    return {**rec, "key": impl, "key_dtype": str(x.dtype), "key_shape": list(shape)}


@functools.cache
def _key_data_of(shape: tuple[int, ...], dtype: Any) -> tuple[str, jax.ShapeDtypeStruct]:
    """The implementation name and key data shape of typed keys of ``shape`` and ``dtype``."""
    impl: list[str] = []

    def data(keys: jax.Array) -> jax.Array:
        impl.append(str(jax.random.key_impl(keys)))
        return jax.random.key_data(keys)

    out = jax.eval_shape(data, jax.ShapeDtypeStruct(shape, dtype))
    return impl[0], out


def _category(dtype: np.dtype) -> int:
    for i, cat in enumerate((np.bool_, jnp.integer, jnp.floating, jnp.complexfloating)):
        if jnp.issubdtype(dtype, cat):
            return i
    return 9


def _castable(src: np.dtype, dst: np.dtype) -> bool:
    """Same dtype, or a cast within or up the order bool -> int -> float -> complex."""
    return src == dst or _category(src) <= _category(dst) < 9


def check_prefix(reader: Reader, prefix: Prefix) -> str:
    base = _prefix_of(prefix)
    if base and reader.node(base) is None:
        near = _nearest(base, reader.paths)
        hint = f"Did you mean {' or '.join(near)}? " if near else ""
        raise StructureMismatchError(
            f"prefix={prefix!r} is not a path in the checkpoint {reader.path}. {hint}Fix: pick a "
            "prefix among the leading parts of jc.list_variables(path)."
        )
    return base


def _nearest(base: str, paths: list[str], most: int = 3) -> list[str]:
    """The saved nodes closest to ``base``: those ending in its last part first, then the
    nearest by spelling."""
    nodes: dict[str, None] = {}
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            nodes["/".join(parts[:i])] = None
    last = base.split("/")[-1]
    ends = [n for n in nodes if n.split("/")[-1] == last]
    close = difflib.get_close_matches(base, list(nodes), n=most, cutoff=0.8)
    return list(dict.fromkeys(ends + close))[:most]


@dataclasses.dataclass
class Target:
    """A target tree flattened, with the checkpoint path each leaf maps to (None: none)."""

    flat: list[tuple[Any, Any]]
    treedef: Any
    cpaths: list[str | None]

    @classmethod
    def of(cls, target: PyTree, prefix: Prefix, rename: Rename) -> Target:
        leaves, treedef = jax.tree_util.tree_flatten(target, is_leaf=_metadata.is_stateful)
        key = _paths_key(treedef, prefix, rename)
        kept = None
        if key is not None:
            with _lock:
                try:
                    kept = _kept.get(key)
                except ValueError:  # auxiliary data whose == is not a bool (an array's)
                    key = None
                if kept is not None:
                    _kept.move_to_end(key)
        if kept is None:
            flat, treedef = jax.tree_util.tree_flatten_with_path(
                target, is_leaf=_metadata.is_stateful
            )
            to_ckpt = _renamer(prefix, rename)
            kept = [k for k, _ in flat], [to_ckpt(_paths.path_str(k)) for k, _ in flat]
            if key is not None:
                with _lock:
                    _kept[key] = kept
                    while len(_kept) > KEEP:
                        _kept.popitem(last=False)
        keypaths, cpaths = kept
        return cls(list(zip(keypaths, leaves, strict=True)), treedef, list(cpaths))

    def groups(self, most: int = 32) -> list[str]:
        """The nodes above the target's leaves (``"a"``, ``"a/b"``), if at most ``most``."""
        out: dict[str, None] = {}
        for p in self.cpaths:
            parts = p.split("/") if p else []
            for i in range(1, len(parts)):
                out["/".join(parts[:i])] = None
            if len(out) > most:
                return []
        return list(out)


# The key paths and checkpoint paths of target structures restored before: a restore into a
# tree of the same structure (a PyTreeDef holds every container and key) with the same
# ``prefix`` and ``rename`` does not walk its key paths again. A callable ``rename`` is not
# kept (it may answer differently another time).
KEEP = 4
_kept: OrderedDict[Any, tuple[list[tuple[Any, ...]], list[str | None]]] = OrderedDict()
_lock = threading.Lock()


def _paths_key(treedef: Any, prefix: Prefix, rename: Rename) -> Any:
    """The key of a target structure's paths in ``_kept``, or None where they are not kept."""
    if rename is not None and not isinstance(rename, dict):
        return None
    try:
        key = (treedef, prefix, None if rename is None else tuple(rename.items()))
        hash(key)
    except TypeError:  # unhashable auxiliary data, a prefix or rename of the wrong type
        return None
    return key


def clear() -> None:
    """Forgets the paths of the target structures restored before."""
    with _lock:
        _kept.clear()


class Pairing(NamedTuple):
    """One target leaf and what it restores from."""

    keypath: tuple[Any, ...]  # the target leaf's jax.tree_util key path
    value: Any  # the target's leaf
    cpath: str | None  # the checkpoint path it maps to (None: the rename dropped it)
    record: Record | None  # the saved leaf record there (None: the checkpoint lacks it)


class Plan(NamedTuple):
    """What a restore reads: the target's leaves paired with records, in flatten order."""

    pairings: list[Pairing]
    treedef: Any
    status: MatchStatus


@phase("restore: matched the target")
def plan(reader: Reader, target: Target, prefix: Prefix, unused: bool) -> Plan:
    """Pairs each target leaf with its saved record; ``unused=False`` skips listing the saved
    leaves the target lacks, so that only the records on the target's paths are read."""
    base = check_prefix(reader, prefix)
    scope = reader.leaves(base) if unused else {}  # read in first: all group files at once
    pairings: list[Pairing] = []
    missing, mismatched, keypaths, used = [], [], {}, set()
    for (keypath, x), cpath in zip(target.flat, target.cpaths, strict=True):
        rec = reader.find(cpath) if cpath is not None else None
        shown = cpath if cpath is not None else _paths.path_str(keypath)
        keypaths[shown] = keypath
        if rec is None or cpath is None:  # (a record was found at a path)
            missing.append(shown)
        else:
            used.add(reader.resolve(cpath))
            if _same_array(x, rec):  # the common case: nothing to wrap, nothing to report
                pairings.append(Pairing(keypath, x, cpath, rec))
                continue
            rec = _as_key(x, rec)
            why = _problem(x, rec)
            if why is not None:
                mismatched.append(Mismatch(shown, _paths.keystr(keypath), why, _describe(rec)))
        pairings.append(Pairing(keypath, x, cpath, rec))
    left = [p for p in scope if p not in used]
    status = MatchStatus(reader.path, missing, left, mismatched, keypaths, reader.keystr)
    return Plan(pairings, target.treedef, status)


def match(
    path: str | os.PathLike[str],
    target: PyTree,
    *,
    prefix: Prefix = None,
    rename: Rename = None,
) -> MatchStatus:
    """Compares ``target`` with the checkpoint at ``path`` without reading any array.

    Args:
        path: a checkpoint directory.
        target: the tree a restore would fill; only its structure, shapes and dtypes matter.
        prefix: as in :func:`restore`.
        rename: as in :func:`restore`.

    Returns:
        A :class:`MatchStatus` with ``missing``, ``unused`` and ``mismatched`` leaves.

    Example:
        >>> status = jc.match(path, {"params": {"l1": {"bias": jnp.zeros(5)}}})  # doctest: +SKIP
        >>> status.assert_existing_objects_matched()  # doctest: +SKIP
    """
    return plan(open_reader(path), Target.of(target, prefix, rename), prefix, unused=True).status
