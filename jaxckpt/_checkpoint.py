"""Saving one checkpoint: ``save`` is the synchronous case of ``save_async``'s path.

A save walks the tree once (structure + leaves), writes every array's shards through
TensorStore with their futures issued together, writes the metadata, then commits: ``COMMIT``
is written last and, on a local disk, the temporary sibling directory is renamed into place.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import os
import sys
import threading
import time
from collections import deque
from typing import Any

import jax
import numpy as np

from . import _chunks, _metadata, _multihost, _storage
from ._errors import CheckpointError, CheckpointExistsError

PyTree = Any
# Host bytes a synchronous save holds in flight (device-to-host copies not yet on disk).
STREAM_BYTES = 512 << 20
# Array leaves under this size are packed together (DESIGN: 1 MiB or more has its own path).
PACK_BELOW = 1 << 20
# Packing starts at this many small leaves: a small model keeps one zarr array per leaf (each
# readable by zarr-python at its own path), while 10,000 tiny arrays do not cost 10,000 files.
PACK_MIN_LEAVES = 64
PACK_CHUNK = 1 << 20  # chunk of a pack array: what reading one small leaf reads at most twice
PACK_MAX = 1 << 30  # a pack array holds at most this many bytes; more start another
PACK_ALIGN = 64  # leaf offsets in a pack: restored leaves are aligned views of the read chunks
PACK_DIR = "~pack"  # "~" starts no escaped edge name, so this never collides with the tree


@dataclasses.dataclass
class _Piece:
    index: tuple[slice, ...]
    data: Any  # np.ndarray, or a single-device jax.Array not yet on the host
    nbytes: int


@dataclasses.dataclass
class _Array:
    loc: str
    meta: dict[str, Any]
    pieces: list[_Piece]


@dataclasses.dataclass
class _Pack:
    """Small leaves concatenated into one 1-D uint8 zarr array at ``loc``."""

    loc: str
    nbytes: int = 0
    starts: list[int] = dataclasses.field(default_factory=list)
    leaves: list[Any] = dataclasses.field(default_factory=list)  # arrays, in ``starts`` order
    chunks: list[np.ndarray] | None = None  # the snapshot: every chunk's bytes

    @property
    def meta(self) -> dict[str, Any]:
        return _storage.array_metadata([self.nbytes], "uint8", [PACK_CHUNK])

    @property
    def n_chunks(self) -> int:
        return -(-self.nbytes // PACK_CHUNK)

    def chunk(self, k: int) -> np.ndarray:
        """The bytes of chunk ``k`` (the last one padded with zeros to a full chunk)."""
        if self.chunks is not None:
            return self.chunks[k]
        lo, hi = k * PACK_CHUNK, min((k + 1) * PACK_CHUNK, self.nbytes)
        buf = np.zeros(PACK_CHUNK, np.uint8)  # alignment gaps and the tail are zeros
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < hi:
            off, raw = self.starts[i], _chunks.as_bytes(np.ascontiguousarray(self.leaves[i]))
            a, b = max(lo, off), min(hi, off + raw.size)
            if b > a:
                buf[a - lo : b - lo] = raw[a - off : b - off]
            i += 1
        return buf


def _pieces(x: Any) -> tuple[list[_Piece], tuple[int, ...] | None]:
    """The parts of ``x`` this process writes (one replica of each shard) and the shard shape.

    In a multi-process job a value local to each process (a NumPy array, or a ``jax.Array``
    on this process's devices only) is saved from process 0, like the tree's Python values.
    """
    from_peer = _multihost.process_count() > 1 and not _multihost.is_primary()
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        shard_shape = tuple(x.sharding.shard_shape(x.shape))
        if from_peer and x.is_fully_addressable:
            return [], shard_shape
        pieces = [
            _Piece(tuple(s.index), s.data, s.data.nbytes)
            for s in x.addressable_shards
            if s.replica_id == 0
        ]
        return pieces, shard_shape
    arr = np.asarray(x)
    if from_peer:
        return [], None
    return [_Piece(tuple(slice(None) for _ in arr.shape), arr, arr.nbytes)], None


def _packable(x: Any) -> bool:
    """A small array leaf on one device (a sharded one keeps chunks that follow its shards)."""
    if isinstance(x, jax.core.Tracer):
        return False  # refused with its key path by _metadata.check_array
    if isinstance(x, jax.Array):
        return len(x.sharding.device_set) == 1 and x.nbytes < PACK_BELOW
    return isinstance(x, (np.ndarray, np.generic)) and x.nbytes < PACK_BELOW


def _plan(tree: PyTree) -> tuple[dict[str, Any], list[_Array], list[_Pack]]:
    arrays: list[_Array] = []
    packs: list[_Pack] = []
    # Packing needs every byte of a leaf on this process; multi-process saves keep one path each.
    pack = _multihost.process_count() == 1 and (
        sum(map(_packable, jax.tree_util.tree_leaves(tree))) >= PACK_MIN_LEAVES
    )

    def array_record(path: str, x: Any) -> dict[str, Any]:  # x passed _metadata.check_array
        dtype = np.dtype(x.dtype)
        shape = tuple(int(d) for d in np.shape(x))
        nbytes = math.prod(shape) * dtype.itemsize
        rec: dict[str, Any] = {"t": "array", "dtype": dtype.name, "shape": list(shape)}
        if isinstance(x, np.generic):
            rec["np_scalar"] = True
        if pack and _packable(x):
            if not packs or packs[-1].nbytes + nbytes > PACK_MAX:
                packs.append(_Pack(f"{PACK_DIR}/{len(packs)}"))
            p = packs[-1]
            start = -(-p.nbytes // PACK_ALIGN) * PACK_ALIGN
            rec["loc"], rec["packed"] = p.loc, [start, nbytes, PACK_CHUNK]
            if nbytes:
                p.starts.append(start)
                p.leaves.append(x)
                p.nbytes = start + nbytes
            return rec
        pieces, shard = _pieces(x)
        data_type = _storage.stored_dtype(dtype)
        chunks = _storage.chunk_shape(shape, dtype.itemsize, shard)
        loc = path or "%"
        arrays.append(_Array(loc, _storage.array_metadata(shape, data_type, chunks), pieces))
        rec["chunks"], rec["loc"] = chunks, loc
        if data_type != dtype.name:
            rec["stored"] = data_type
        return rec

    record, _ = _metadata.describe(tree, array_record)
    return record, arrays, packs


def _group_files(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    files: dict[str, Any] = {}
    if node["t"] in ("array", "value", "state"):
        return files
    if prefix:
        files[f"{prefix}/zarr.json"] = _storage.group_json()
    from ._paths import name_of

    for kind, key, child in node["c"]:
        name = name_of(kind, key)
        files.update(_group_files(child, f"{prefix}/{name}" if prefix else name))
    return files


def _to_host(data: Any, copy: bool) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.array(data, copy=True) if copy else data
    arr = np.asarray(data)
    # On the CPU backend np.asarray may alias the device buffer: a snapshot must own its bytes.
    return np.array(arr, copy=True) if copy and not arr.flags.owndata else arr


def _snapshot_bytes(arrays: list[_Array], packs: list[_Pack]) -> int:
    return sum(p.nbytes for a in arrays for p in a.pieces) + sum(
        k.n_chunks * PACK_CHUNK for k in packs
    )


def _snapshot(arrays: list[_Array], packs: list[_Pack]) -> None:
    """Copies every piece to host memory that this save owns (donation-safe).

    The copies run on the I/O threads (NumPy releases the GIL while copying); small leaves
    are copied straight into the chunks of their pack.
    """
    for a in arrays:
        for p in a.pieces:
            if isinstance(p.data, jax.Array):
                p.data.copy_to_host_async()
    cp = _chunks.pool("copy")
    jobs = [cp.submit(_copy_piece, p) for a in arrays for p in a.pieces]
    for k in packs:
        k.chunks = list(cp.map(k.chunk, range(k.n_chunks)))
        k.leaves = []
    for j in jobs:
        j.result()


def _copy_piece(p: _Piece) -> None:
    if isinstance(p.data, jax.Array) and next(iter(p.data.devices())).platform != "cpu":
        p.data = np.asarray(p.data)  # a fresh host copy already (not a view of the device)
        return
    src = _to_host(p.data, copy=False)
    dst = np.empty(src.shape, src.dtype)
    np.copyto(dst, src)
    p.data = dst


def _write_arrays(root: str, arrays: list[_Array], packs: list[_Pack], budget: int) -> None:
    """Writes every array and pack, keeping at most ``budget`` device bytes in host flight.

    On a local disk the chunk files are written directly by the I/O threads (made durable
    by :func:`_durable`); anything else goes through TensorStore.
    """
    if not _storage.is_local(root):
        _write_arrays_ts(root, arrays, budget)
        for k in packs:
            whole = np.concatenate([k.chunk(i) for i in range(k.n_chunks)])[: k.nbytes]
            store = _result(root, k.loc, _storage.open_array(root, k.loc, k.meta, create=True))
            _result(root, k.loc, store.write(whole))
        return
    io = _chunks.pool()
    jobs: deque[tuple[Any, int, _Array | str | None]] = deque()
    if _multihost.is_primary():  # process 0 writes each array's zarr.json
        for loc, meta in [(a.loc, a.meta) for a in arrays] + [(k.loc, k.meta) for k in packs]:
            path = os.path.join(root, loc, "zarr.json")
            jobs.append((io.submit(_chunks.write_json, path, meta), 0, None))
    held = 0
    fallback: dict[int, _Array] = {}
    for a in arrays:
        m = a.meta
        for p in a.pieces:
            if math.prod(m["shape"]) == 0:
                continue
            job = io.submit(
                _chunks.write_piece,
                root,
                a.loc,
                m["data_type"],
                m["chunk_grid"]["configuration"]["chunk_shape"],
                m["shape"],
                p.index,
                functools.partial(_to_host, p.data, False),
            )
            cost = 0 if isinstance(p.data, np.ndarray) else p.nbytes
            jobs.append((job, cost, a))
            held += cost
            while held > budget and jobs:
                done, n, owner = jobs.popleft()
                if _wrap_os(root, owner, done.result) is False and isinstance(owner, _Array):
                    fallback[id(owner)] = owner
                held -= n
    for k in packs:
        for i in range(k.n_chunks):
            jobs.append((io.submit(_write_pack_chunk, root, k, i), 0, k.loc))
    try:
        for done, _, owner in jobs:
            if _wrap_os(root, owner, done.result) is False and isinstance(owner, _Array):
                fallback[id(owner)] = owner
    except BaseException:
        for done, _, _ in jobs:  # let every write land before the caller removes the directory
            done.exception()
        raise
    if fallback:
        _write_arrays_ts(root, list(fallback.values()), budget)


def _write_pack_chunk(root: str, k: _Pack, i: int) -> None:
    d = os.path.join(root, k.loc, "c")
    os.makedirs(d, exist_ok=True)
    _chunks.write_chunk(os.path.join(d, str(i)), k.chunk(i))


def _write_json_files(root: str, files: dict[str, Any]) -> None:
    """The metadata files: written by the I/O threads on a local disk, else by TensorStore."""
    if _storage.is_local(root):
        write = lambda kv: _chunks.write_json(os.path.join(root, kv[0]), kv[1])  # noqa: E731
        _wrap_os(root, "", lambda: list(_chunks.pool().map(write, files.items())))
        return
    kv = _storage.open_kv(root)
    for f in _storage.write_json_files(kv, files):
        _result(root, "", f)


def _durable(root: str) -> None:
    """Every byte this process wrote under ``root`` is on disk (TensorStore syncs its own)."""
    # A directory already gone was removed by peers that gave up on this save: the barrier
    # that follows says so better than a failed sync would.
    if _storage.is_local(root) and os.path.isdir(root):
        _wrap_os(root, "", lambda: _chunks.make_durable(root))


def _write_arrays_ts(root: str, arrays: list[_Array], budget: int) -> None:
    """TensorStore writes every piece, keeping at most ``budget`` bytes in flight."""
    peer = not _multihost.is_primary()  # process 0 writes each array's zarr.json
    opened = [
        _storage.open_array(root, a.loc, a.meta, create=True, peer_creates=peer) for a in arrays
    ]
    inflight: deque[tuple[Any, int, str]] = deque()
    held = 0
    try:
        for a, fut in zip(arrays, opened, strict=True):
            store = _result(root, a.loc, fut)
            for p in a.pieces:
                host = _to_host(p.data, copy=False)
                if host.dtype.name != a.meta["data_type"]:
                    host = host.view(a.meta["data_type"])
                w = store[p.index].write(host, can_reference_source_data_indefinitely=True)
                inflight.append((w, p.nbytes, a.loc))
                held += p.nbytes
                while held > budget and inflight:
                    done, n, loc = inflight.popleft()
                    _result(root, loc, done)
                    held -= n
        for w, _, loc in inflight:
            _result(root, loc, w)
    except BaseException:
        # Let every write still in flight land before the caller removes what was written.
        for f in [*opened, *(w for w, _, _ in inflight)]:
            f.exception()
        raise


def _wrap_os(root: str, owner: _Array | str | None, fn: Any) -> Any:
    """Runs a local write; its ``OSError`` (a full disk, say) names the directory and array."""
    try:
        return fn()
    except OSError as e:
        loc = owner.loc if isinstance(owner, _Array) else (owner or "")
        raise _storage.storage_error(root, e, loc) from e


def _result(root: str, loc: str, fut: Any) -> Any:
    """A write's result; its storage error (after TensorStore's retries) names URL and array."""
    try:
        return fut.result()
    except ValueError as e:
        raise _storage.storage_error(root, e, loc) from e


@dataclasses.dataclass
class _Save:
    final: str
    record: dict[str, Any]
    arrays: list[_Array]
    packs: list[_Pack]
    extra: dict[str, Any]
    sync: _multihost.SaveSync


def _prepare(path: str | os.PathLike[str], tree: PyTree, extra: dict[str, Any]) -> _Save:
    final = _storage.normalize(path)
    _check_free(final)
    record, arrays, packs = _plan(tree)
    sync = _multihost.SaveSync(f"the save to {final}", ("start", "written", "committed"))
    return _Save(final, record, arrays, packs, extra, sync)


def _check_free(final: str) -> None:
    """Raises ``CheckpointExistsError`` unless ``final`` is absent or an empty directory."""
    if _storage.is_committed(final):
        raise CheckpointExistsError(
            f"A checkpoint already exists at {final}; jaxckpt never overwrites one. Fix: save "
            "to a new path (e.g. one per step), or delete the old checkpoint first."
        )
    if _storage.occupied(final):
        raise CheckpointExistsError(
            f"{final} exists and is neither an empty directory nor a checkpoint. Fix: choose "
            "another path, or remove that directory."
        )


def _agree_on_tmp(s: _Save) -> str:
    """The temporary directory process 0 picked; every process must be saving to ``s.final``."""

    def pick() -> str:  # process 0 only
        return json.dumps([s.final, _storage.tmp_sibling(s.final)])

    final, tmp = json.loads(s.sync.share("tmp", pick))
    if final != s.final:
        raise CheckpointError(  # not a CoordinationError: it is reported to the other processes
            f"jaxckpt: process {_multihost.process_index()} saves to {s.final} while process 0 "
            f"saves to {final}. Every process must call save with the same path, in the same "
            "order. Fix: derive the path from a value all processes share, such as the step."
        )
    return tmp


def _check_shared(tmp: str, final: str) -> None:
    """The directory process 0 made must be visible to every process: the storage is shared."""
    if "://" in tmp or _storage.is_dir(tmp):
        return
    raise CheckpointError(
        f"jaxckpt: process {_multihost.process_index()} does not see the directory {tmp} that "
        f"process 0 created for the save to {final}: that path is not on storage every process "
        "shares (a disk local to each host?), so no process could read the whole checkpoint. "
        "Fix: save to a filesystem mounted on every host (NFS, Lustre, a GCS/S3 FUSE mount) or "
        "to an object store URL (gs://bucket/run, s3://bucket/run)."
    )


def _keep_every_state(s: _Save, states: dict[str, str]) -> None:
    """On process 0: a state leaf that differs between processes keeps each one's state."""
    every = [json.loads(v) for v in s.sync.collect("states", json.dumps(states))]
    for path, rec in _metadata.iter_leaves(s.record):
        if rec["t"] == "state":
            per = [d.get(path, rec["v"]) for d in every]
            if len(set(per)) > 1:
                rec["per_process"] = per


def _execute(s: _Save, budget: int) -> str:
    """Writes, then commits; in a multi-process job every process runs this together.

    Each process writes its own shards; process 0 also writes the metadata, and the ``COMMIT``
    only once every process has passed the ``written`` barrier.
    """
    primary = _multihost.is_primary()
    tmp = None
    try:
        tmp = _agree_on_tmp(s)
        states = {p: r["v"] for p, r in _metadata.iter_leaves(s.record) if r["t"] == "state"}
        if states:
            s.sync.post("states", json.dumps(states))
        if primary:
            _storage.begin(tmp)
        s.sync.barrier("start")
        if not primary:
            _check_shared(tmp, s.final)
        elif states and s.sync.multi:
            _keep_every_state(s, states)
        _write_arrays(tmp, s.arrays, s.packs, budget)
        if primary:
            attrs = _metadata.root_attributes(s.record, {"time": time.time(), **s.extra})
            files = {"zarr.json": _storage.group_json(attrs), **_group_files(s.record)}
            if s.packs:
                files[f"{PACK_DIR}/zarr.json"] = _storage.group_json()
            _write_json_files(tmp, files)
        _durable(tmp)
        s.sync.barrier("written")
        if primary:
            _storage.write_bytes_durable(tmp, _storage.COMMIT, b"{}")
            try:
                _storage.commit(tmp, s.final)
            except OSError:
                _check_free(s.final)  # another save got there first: say so plainly
                raise
        s.sync.barrier("committed")
    except BaseException as e:
        s.sync.abandon(e)
        if primary and tmp is not None:
            _storage.remove_tree(tmp)
        raise
    return s.final


class SaveHandle:
    """A save in flight: ``wait()`` returns the final path or raises the save's error."""

    def __init__(self, save: _Save, held: int):
        self.path = save.final
        self._error: BaseException | None = None
        self._seen = False
        self._thread = threading.Thread(target=self._run, args=(save, held), daemon=True)
        self._thread.start()

    def _run(self, save: _Save, held: int) -> None:
        try:
            _execute(save, budget=1 << 62)
        except BaseException as e:  # surfaced by wait(), the next save, or a manager's close()
            self._error = e
        finally:
            save.arrays, save.packs = [], []  # the snapshot's memory goes back before release
            _release(held)

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed)."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> str:
        """Blocks until the save is committed; returns its path or raises its error."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the save to {self.path} is still running after {timeout} s")
        _unfinished.discard(self)
        if self._error is not None:
            self._seen = True
            raise self._error
        return self.path

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"SaveHandle({self.path!r}, {state})"


_unfinished: set[SaveHandle] = set()


def _finish_at_exit() -> None:
    """A script that ends with saves in flight still commits them (or says why not)."""
    for h in list(_unfinished):
        try:
            h.wait()
        except BaseException as e:  # noqa: BLE001 - reported, the interpreter is exiting
            print(f"jaxckpt: the asynchronous save to {h.path} failed: {e}", file=sys.stderr)


# Runs after the main thread ends and before the I/O thread pools shut down (threading calls
# these hooks in reverse order of registration; _chunks registered its pools' hook first).
threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]

# Host memory held by the snapshots of saves in flight. A new save_async waits for older ones
# to finish while its snapshot would push the total over the limit (one save alone may exceed
# it: it then runs by itself). See docs/speed.md.
_held = 0
_held_cv = threading.Condition()


def async_host_bytes() -> int:
    """The bound on host bytes held by async saves in flight (``JAXCKPT_ASYNC_HOST_BYTES``)."""
    env = os.environ.get("JAXCKPT_ASYNC_HOST_BYTES")
    if env:
        return int(env)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1 << 30, total // 4)


def _reserve(n: int) -> None:
    global _held
    limit = async_host_bytes()
    with _held_cv:
        _held_cv.wait_for(lambda: _held == 0 or _held + n <= limit)
        _held += n


def _release(n: int) -> None:
    global _held
    with _held_cv:
        _held -= n
        _held_cv.notify_all()


def _raise_earlier_errors() -> None:
    """An async save's error nobody waited for is raised by the next save."""
    for h in list(_unfinished):
        if h.done():
            _unfinished.discard(h)
            if h._error is not None and not h._seen:
                h._seen = True
                raise CheckpointError(
                    f"An earlier asynchronous save to {h.path} failed: {h._error}. Its "
                    "checkpoint was not written; this save did not start. Fix: resolve the "
                    "cause and save again."
                ) from h._error


def save(
    path: str | os.PathLike[str],
    tree: PyTree,
    *,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """Saves ``tree`` to the directory ``path``, atomically; returns the final path.

    The save streams: arrays already in host memory are written from where they are, device
    arrays are copied to the host at most ``STREAM_BYTES`` at a time. It is durable (fsynced)
    when it returns.

    Example:
        >>> jc.save("/tmp/ckpt-1", {"w": np.ones(3)})  # doctest: +SKIP
        '/tmp/ckpt-1'
    """
    _raise_earlier_errors()
    s = _prepare(path, tree, _extra(step, metrics))
    return _execute(s, budget=STREAM_BYTES)


def save_async(
    path: str | os.PathLike[str],
    tree: PyTree,
    *,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> SaveHandle:
    """Snapshots ``tree`` to host memory, then saves it in the background.

    Returns once the snapshot is taken: the caller may then donate, delete or mutate its
    arrays. ``handle.wait()`` blocks until the checkpoint is committed and raises the save's
    error, if any; an error nobody waited for is raised by the next save. While the snapshots
    of saves in flight would exceed :func:`async_host_bytes`, this call first waits for older
    saves to finish.
    """
    _raise_earlier_errors()
    s = _prepare(path, tree, _extra(step, metrics))
    held = _snapshot_bytes(s.arrays, s.packs)
    _reserve(held)
    try:
        _snapshot(s.arrays, s.packs)
    except BaseException:
        _release(held)
        raise
    h = SaveHandle(s, held)
    _unfinished.add(h)
    return h


def _extra(step: int | None, metrics: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if step is not None:
        out["step"] = int(step)
    if metrics:
        out["metrics"] = {str(k): np.asarray(v).tolist() for k, v in metrics.items()}
    return out
