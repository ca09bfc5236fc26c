"""Plans of trees saved before: a tree whose structure did not change is not walked again.

A training loop saves the same tree every time: the same containers and keys, and leaves of
the same types, shapes, dtypes and shardings. Walking it (:func:`jaxckpt.checkpoint.plan.plan`: a
record per leaf, key checks, packing) costs tens of microseconds per leaf, which a tree of
10,000 small arrays pays on every save, inside ``save_async``'s call. So the plan of each tree
saved is kept as a :class:`Template` under a key of its structure (the ``PyTreeDef``) and each
leaf's type, shape, dtype and sharding; the next save of a tree with the same key takes the
template's records (unpickled: no walk) and puts the new leaves where the old ones were.

Only trees whose leaves are all arrays (no typed PRNG keys) or Python scalars, str and bytes
are kept: a value leaf's record is made again on every save (its value may change: a step
count), and a leaf with ``get_state`` is saved through the full walk each time. A template
holds no reference to the tree's arrays.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import jax
import numpy as np

from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.format import metadata as _metadata
from jaxckpt.format.metadata import Record

PyTree = Any
KEEP = 4  # templates kept (the most recently used): a job saves one or two kinds of tree
_VALUE_TYPES = (bool, int, float, complex, str, bytes)


@dataclasses.dataclass
class Template:
    """What a plan of one tree structure is made of, without the tree's arrays."""

    record: bytes  # the pickled structure record, as ``_plan.plan`` made it (before any write)
    # Per leaf, in flatten order: ("pack", k) | ("array", (loc, meta)) | ("value", None) |
    # ("none", None) for a zero-size packed leaf, which has nothing to write.
    kinds: list[tuple[str, Any]]
    packs: list[tuple[str, int, list[int], list[int]]]  # (loc, nbytes, starts, leaf indices)


@dataclasses.dataclass
class Plan:
    """A save's plan. ``record`` is None until :meth:`bind` (which attaches the leaf records
    to the arrays and packs) has run: an async save binds on its background thread."""

    record: Record | None
    arrays: list[_plan.Array]
    packs: list[_plan.Pack]
    bind: Callable[[], Record] | None = None


_cache: OrderedDict[int, tuple[Any, Template]] = OrderedDict()  # by the key's hash
_lock = threading.Lock()


def clear() -> None:
    with _lock:
        _cache.clear()


@_metadata.gc_paused()  # no collection (and JAX's gc callback) for the keys of 10,000 leaves
def plan(tree: PyTree) -> Plan:
    """The plan of ``tree``: from a kept template when its key matches, else walked (and a
    template kept for the next save)."""
    if _multihost.process_count() > 1:  # who writes which share is dealt out per save
        return Plan(*_plan.plan(tree))
    flat, treedef = jax.tree_util.tree_flatten(tree)
    key = _key(flat, treedef)
    tpl = None
    if key is not None:
        h = hash(key)  # once: hashing the key hashes an entry per leaf
        with _lock:
            kept = _cache.get(h)
            if kept is not None and kept[0] == key:
                tpl = kept[1]
                _cache.move_to_end(h)
    if tpl is not None:
        return _instantiate(tpl, flat)
    record, arrays, packs = _plan.plan(tree)
    if key is not None:
        made = _template(record, arrays, packs, flat)
        if made is not None:
            with _lock:
                _cache[h] = (key, made)
                while len(_cache) > KEEP:
                    _cache.popitem(last=False)
    return Plan(record, arrays, packs)


def _key(flat: list[Any], treedef: Any) -> Any:
    """The template key of a flattened tree, or None for a tree no template is kept for."""
    sig: list[Any] = []
    shardings: list[Any] = []  # the distinct ones, each hashed once (by Python code: slow)
    seen: dict[int, int] = {}  # id -> index in shardings; the leaves keep them alive meanwhile
    for x in flat:
        t = type(x)
        kind = _kinds.get(t) or _kind(t)
        if kind == "value":
            sig.append(t)
        elif kind == "jax":
            s = x.sharding
            j = seen.get(id(s))
            if j is None:
                j = seen[id(s)] = len(shardings)
                shardings.append(s)
            a = x.aval  # one attribute: x.shape and x.dtype are each a property call through it
            sig.append((t, a.shape, a.dtype, j))
        elif kind == "numpy":
            sig.append((t, x.shape, x.dtype))
        else:  # a stateful leaf, a tracer, anything else: walked every time
            return None
    # Packing's settings (tests change them) and the process's place in the job shape a plan.
    settings = (
        _plan.PACK_BELOW,
        _plan.PACK_MIN_LEAVES,
        _plan.PACK_CHUNK,
        _plan.PACK_MAX,
        _plan.PACK_ALIGN,
        _multihost.process_count(),
        _multihost.process_index(),
    )
    key = (treedef, tuple(sig), tuple(shardings), settings)
    try:
        hash(key)
    except TypeError:  # an unhashable sharding or node data
        return None
    return key


_kinds: dict[type, str] = {}  # a leaf type's kind, found once (isinstance on jax.Array is slow)


def _kind(t: type) -> str:
    if t in _VALUE_TYPES:
        kind = "value"
    elif issubclass(t, jax.core.Tracer):
        kind = "other"
    elif issubclass(t, jax.Array):
        kind = "jax"
    elif t is np.ndarray or issubclass(t, np.generic):
        kind = "numpy"
    else:
        kind = "other"
    _kinds[t] = kind
    return kind


def _leaf_records(node: Record, out: list[Record]) -> list[Record]:
    """The leaf records of a structure record, in order (``iter_leaves`` without paths)."""
    if node["t"] in _metadata.LEAF_KINDS:
        out.append(node)
    else:
        for _, _, child in node["c"]:
            _leaf_records(child, out)
    return out


def _template(
    record: Record, arrays: list[_plan.Array], packs: list[_plan.Pack], flat: list[Any]
) -> Template | None:
    """A template of a plan just made (its records not yet changed by a write)."""
    recs = _leaf_records(record, [])
    if len(recs) != len(flat):
        return None  # a leaf the walk sees otherwise than ``tree_flatten`` (a stateful node)
    array_of = {id(a.record): a for a in arrays}
    pack_of: dict[int, int] = {}
    for k, p in enumerate(packs):
        for r in p.records:
            pack_of[id(r)] = k
    kinds: list[tuple[str, Any]] = []
    members: list[list[int]] = [[] for _ in packs]
    for i, (rec, x) in enumerate(zip(recs, flat, strict=True)):
        if rec["t"] == "value" and type(x) in _VALUE_TYPES:
            kinds.append(("value", None))
        elif rec["t"] != "array" or "key" in rec or type(x) in _VALUE_TYPES:
            return None
        elif id(rec) in pack_of:
            k = pack_of[id(rec)]
            members[k].append(i)
            kinds.append(("pack", k))
        elif id(rec) in array_of:
            a = array_of[id(rec)]
            kinds.append(("array", (a.loc, a.meta)))
        elif "packed" in rec and rec["packed"][1] == 0:
            kinds.append(("none", None))
        else:
            return None
    return Template(
        pickle.dumps(record, pickle.HIGHEST_PROTOCOL),
        kinds,
        [(p.loc, p.nbytes, list(p.starts), m) for p, m in zip(packs, members, strict=True)],
    )


def _instantiate(tpl: Template, flat: list[Any]) -> Plan:
    """The plan of ``flat`` (leaves of a tree with ``tpl``'s key); its records come at bind."""
    packs = [
        _plan.Pack(loc, nbytes, starts, [flat[i] for i in idx])
        for loc, nbytes, starts, idx in tpl.packs
    ]
    arrays: list[_plan.Array] = []
    owners: list[tuple[int, _plan.Array]] = []
    values: list[tuple[int, Any]] = []
    for i, (kind, what) in enumerate(tpl.kinds):
        if kind == "array":
            pieces, _ = _plan._pieces(flat[i])
            a = _plan.Array(what[0], what[1], pieces, {}, _plan.source_of(flat[i]))
            arrays.append(a)
            owners.append((i, a))
        elif kind == "value":
            values.append((i, flat[i]))

    @_metadata.gc_paused()  # 10,000 records unpickled would trigger collections
    def bind() -> Record:
        record = pickle.loads(tpl.record)
        recs = _leaf_records(record, [])
        for k, (_, _, _, idx) in zip(packs, tpl.packs, strict=True):
            k.records = [recs[i] for i in idx]
        for i, a in owners:
            a.record = recs[i]
        for i, v in values:
            held = cast(dict[str, Any], recs[i])  # the record the template's tree holds
            held.clear()
            held.update(_metadata.value_record(v, ""))
        return record

    return Plan(None, arrays, packs, bind)
