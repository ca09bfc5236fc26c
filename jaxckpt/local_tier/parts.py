"""A process's part of a local-tier step, and how parts travel between processes.

A local-tier step ``s`` is, in each process's local directory, ``ckpt-<s>/process-<o>``: the
part of process ``o`` (this process's own, or a replica of a peer's), each a plain jaxckpt
checkpoint with its own ``COMMIT``. A part holds, for every array sharded over several
processes, the distinct shards process ``o`` held (``shards/a<i>/s<j>``) and their ``layout``
(key path, shape, dtype and shard indices), and every other leaf of the tree whole (``tree``;
each sharded array there is a 0). The layout's hash says which restores a part can serve: one
into the same shardings by as many processes.

Parts travel between processes as their files (:mod:`jaxckpt.local_tier.channel`): no
filesystem is shared between hosts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from typing import Any

import jax
import numpy as np

from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.errors import CheckpointError

PyTree = Any
PART = "process-"
FORMAT = 1


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"ckpt-{step}")


def part_dir(root: str, step: int, owner: int) -> str:
    return os.path.join(step_dir(root, step), f"{PART}{owner}")


def owner_of(name: str) -> int | None:
    rest = name[len(PART) :] if name.startswith(PART) else ""
    return int(rest) if rest.isdigit() and str(int(rest)) == rest else None


def is_committed(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _storage.COMMIT))


# ---------------------------------------------------------------------------- layout


def _index(index: tuple[Any, ...], shape: tuple[int, ...]) -> list[list[int]]:
    """A shard's index as ``[[start, stop], ...]`` per dimension."""
    out = []
    for sl, dim in zip(index, shape, strict=True):
        start, stop, _ = sl.indices(dim)
        out.append([start, stop])
    return out


def _sharded(x: Any) -> bool:
    """A leaf sharded over several processes: its part holds only this process's shards."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return False
    return not sharding.is_fully_addressable


def _leaf_layout(key: str, x: Any) -> list[Any]:
    shape = tuple(int(d) for d in x.shape)
    indices = {
        json.dumps(_index(tuple(i), shape))
        for i in x.sharding.addressable_devices_indices_map(shape).values()
    }
    return [key, list(shape), np.dtype(x.dtype).name, sorted(json.loads(i) for i in indices)]


def layout_of(tree: PyTree) -> list[list[Any]]:
    """The layout of ``tree``'s sharded leaves on this process (a tree or a restore target)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [_leaf_layout(jax.tree_util.keystr(path), x) for path, x in leaves if _sharded(x)]


def layout_hash(processes: int, layout: list[list[Any]]) -> str:
    text = json.dumps([FORMAT, processes, layout], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def split(tree: PyTree) -> tuple[dict[str, Any], list[np.ndarray]]:
    """This process's part of ``tree``, a copy the caller's later changes (donation) leave
    alone: a tree ``jc.save`` writes alone, and the host snapshot buffers it holds (for
    :func:`jaxckpt.runtime.give_buffers` once written). Shards copied on their device are
    ``jax.Array`` copies (the write moves them to the host)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    rest: list[Any] = []
    shards: dict[str, dict[str, np.ndarray]] = {}
    layout: list[Any] = []
    copies: list[tuple[np.ndarray, Any]] = []
    buffers: list[np.ndarray] = []
    rooms: dict[Any, int] = {}  # per accelerator: bytes its copies may still take
    for path, x in leaves:
        if not _sharded(x):
            rest.append(_own_copy(x, rooms))
            continue
        entry = _leaf_layout(jax.tree_util.keystr(path), x)
        by_index: dict[str, Any] = {}
        for s in x.addressable_shards:
            by_index.setdefault(json.dumps(_index(tuple(s.index), tuple(x.shape))), s.data)
        # A copy: the caller may donate its arrays once save returns. Where the shard's
        # device has room (the CPU always: its copy is the host copy), a copy made by the
        # device, dispatched without waiting: JAX runs it before any later use of the
        # original's buffer, donation included, so the caller does not wait for the bytes.
        # Else into the snapshot buffers async saves reuse (fresh memory costs more).
        mine = shards[f"a{len(layout)}"] = {}
        for j, i in enumerate(entry[3]):
            data = by_index[json.dumps(i)]
            if _copy_on_device(data, rooms):
                mine[f"s{j}"] = jax.device_put(data, data.sharding, may_alias=False)
                continue
            dtype, shape = np.dtype(data.dtype), tuple(data.shape)
            nbytes = math.prod(shape) * dtype.itemsize
            buffers.append(_runtime.take_buffer(max(1, nbytes)))
            dest = buffers[-1][:nbytes].view(dtype).reshape(shape)
            copies.append((dest, data))
            mine[f"s{j}"] = dest
        layout.append(entry)
        rest.append(0)
    if copies:
        list(_runtime.pool("copy").map(_copy, *zip(*copies, strict=True)))
    part = {
        "format": FORMAT,
        "processes": _multihost.process_count(),
        "layout": json.dumps(layout),
        "shards": shards,
        "tree": jax.tree_util.tree_unflatten(treedef, rest),
    }
    return part, buffers


def _copy_on_device(data: Any, rooms: dict[Any, int]) -> bool:
    """Whether to copy the shard ``data`` on its own device: the CPU's, or an accelerator
    whose free memory keeps half of it free after this save's copies."""
    if not isinstance(data, jax.Array):
        return False
    devices = data.devices()
    device = next(iter(devices))
    if device.platform == "cpu":
        return True
    if len(devices) > 1:  # a leaf on several accelerators: copied to the host in the call
        return False
    if device not in rooms:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # a backend without memory statistics
            stats = {}
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
        rooms[device] = max(0, free // 2)
    nbytes = int(data.nbytes)
    if nbytes > rooms[device]:
        return False
    rooms[device] -= nbytes
    return True


def _own_copy(x: Any, rooms: dict[Any, int]) -> Any:
    """A leaf written whole: an array copied (the caller may donate or change it), else as is."""
    if isinstance(x, jax.Array):
        if _copy_on_device(x, rooms):
            return jax.device_put(x, x.sharding, may_alias=False)
        return np.array(x, copy=True)
    if isinstance(x, np.ndarray):
        return np.array(x, copy=True)
    return x


def _copy(dest: np.ndarray, x: Any) -> None:
    np.copyto(dest, np.asarray(x))


def read_hash(path: str) -> tuple[int, str]:
    """``(processes, layout hash)`` of the committed part at ``path``."""
    from jaxckpt.checkpoint.reader import Reader

    with _multihost.alone():
        reader = Reader(path)
        processes = int(reader["processes"])
        layout = json.loads(str(reader["layout"]))
    return processes, layout_hash(processes, layout)


def assemble(path: str, target: PyTree) -> PyTree:
    """Restores ``target`` from the part at ``path``: its sharded leaves from the part's shards
    (onto the target's own shardings), every other leaf as ``jc.restore`` does."""
    from jaxckpt.checkpoint.reader import Reader
    from jaxckpt.checkpoint.restore import restore

    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    with _multihost.alone():
        reader = Reader(path)
        layout = json.loads(str(reader["layout"]))
        sharded = [i for i, (_, x) in enumerate(leaves) if _sharded(x)]
        rest = [0 if i in set(sharded) else x for i, (_, x) in enumerate(leaves)]
        out = jax.tree_util.tree_flatten(
            restore(path, jax.tree_util.tree_unflatten(treedef, rest), prefix="tree")
        )[0]
        # Every shard read at once (the reader's I/O threads), each distinct one once.
        paths: dict[str, int] = {}
        plan = []
        for n, i in enumerate(sharded):
            _, shape, _, indices = layout[n]
            x = leaves[i][1]
            where = {json.dumps(idx): j for j, idx in enumerate(indices)}
            devices = []
            for device, index in x.sharding.addressable_devices_indices_map(tuple(shape)).items():
                j = where[json.dumps(_index(tuple(index), tuple(shape)))]
                devices.append((device, paths.setdefault(f"shards/a{n}/s{j}", len(paths))))
            plan.append((i, x.sharding, tuple(shape), devices))
        data = reader.read_many([(path, None) for path in paths])
        for i, sharding, shape, devices in plan:
            arrays = [jax.device_put(data[r], device) for device, r in devices]
            out[i] = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------- files


def files_of(path: str) -> list[str]:
    """The files of the part at ``path``, relative to it, ``COMMIT`` last."""
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), path))
    return sorted(found, key=lambda rel: (rel == _storage.COMMIT, rel))


def remove(path: str) -> None:
    """Removes ``path`` (a step or a part) atomically: renamed first, so a crash never leaves a
    half-deleted part that still looks committed. Another process may remove it too."""
    tmp = f"{path}{_storage.TMP_MARK}del-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, tmp)
    except FileNotFoundError:
        return
    shutil.rmtree(tmp, ignore_errors=True)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(staged: str, path: str, durable: bool = True) -> None:
    """Moves a part received whole into ``staged`` (files synced if ``durable``) to ``path``."""
    for root, _, _ in os.walk(staged) if durable else ():
        _sync_dir(root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if is_committed(path):  # a process sharing this directory already holds it
        shutil.rmtree(staged, ignore_errors=True)
        return
    if not is_committed(staged):
        shutil.rmtree(staged, ignore_errors=True)
        raise CheckpointError(f"jaxckpt: the part received for {path} has no {_storage.COMMIT}.")
    os.rename(staged, path)
    if durable:
        _sync_dir(os.path.dirname(path))
