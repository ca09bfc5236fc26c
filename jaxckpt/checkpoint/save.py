"""Saving one checkpoint: ``save`` is the synchronous case of ``save_async``'s path.

A save plans the tree once (:mod:`jaxckpt.checkpoint.write`), writes every array's pieces, writes the
metadata, then commits: ``COMMIT`` is written last and, on a local disk, the temporary sibling
directory is renamed into place. In a multi-process job every process runs the same steps,
with barriers between them; ``save_async`` runs them in a thread after a host snapshot.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import operator
import os
import sys
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

import jax
import numpy as np

from jaxckpt import progress as _progress
from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import incremental as _incremental
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import plan_cache as _plan_cache
from jaxckpt.checkpoint import snapshot as _snapshot
from jaxckpt.checkpoint import write as _write
from jaxckpt.errors import CheckpointError, CheckpointExistsError, StorageError
from jaxckpt.format import commit as _commit
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import split as _split
from jaxckpt.log import logged_save, logged_save_async
from jaxckpt.storage import arrays as _arrays

PyTree = Any


@dataclasses.dataclass
class _Save:
    final: str
    record: dict[str, Any]  # empty until ``bind`` ran (a plan from a kept template)
    arrays: list[_write.Array]
    packs: list[_write.Pack]
    extra: dict[str, Any]
    sync: _multihost.SaveSync
    buffers: list[np.ndarray] = dataclasses.field(default_factory=list)  # an async snapshot's
    time: float = 0.0  # when it was written, as its metadata says
    inc: _incremental.Save | None = None  # what it links from its base, and records
    bind: Callable[[], dict[str, Any]] | None = None  # makes ``record`` (_plan_cache.Plan)


def _prepare(
    path: str | os.PathLike[str],
    tree: PyTree,
    extra: dict[str, Any],
    base: str | os.PathLike[str] | None = None,
    hashing: bool = False,
) -> _Save:
    final = _storage.normalize(path)
    if base is not None and not isinstance(base, (str, os.PathLike)):
        raise TypeError(
            f"base must be the path of an earlier checkpoint (str or os.PathLike), not {base!r} "
            f"({type(base).__name__}). Fix: pass the path that save returned, or base=None."
        )
    sync = _multihost.SaveSync(f"the save to {final}", ("start", "written", "committed"))
    if not sync.multi:  # several processes: process 0 checks, for all (``_agree_on_tmp``)
        _check_free(final)
    p = _plan_cache.plan(tree)  # a tree saved before is not walked again
    inc = _incremental.prepare(final, p.arrays, None if base is None else os.fspath(base), hashing)
    return _Save(final, p.record or {}, p.arrays, p.packs, extra, sync, inc=inc, bind=p.bind)


def _complete(s: _Save) -> None:
    """Makes the save's record (a plan from a kept template attaches each leaf's record to its
    array or pack) and seals an async snapshot's packs. Deferred to here, an async save's
    background thread: the caller of ``save_async`` waits only for the snapshot."""
    if s.bind is not None:
        s.record, s.bind = s.bind(), None
    _snapshot.seal_packs(s.packs)


def _check_free(final: str) -> None:
    """Raises ``CheckpointExistsError`` unless ``final`` is absent or an empty directory (a
    ``StorageError`` where the file system refuses to tell: a directory it may not list)."""
    try:
        store = _storage.at(final)
        committed = store.is_committed()
        occupied = not committed and store.occupied()
    except OSError as e:
        error = _storage.save_error(final, e)
        if error is e:
            raise
        raise error from e
    if committed:
        raise CheckpointExistsError(
            f"A checkpoint already exists at {final}; jaxckpt never overwrites one. Fix: save "
            "to a new path (e.g. one per step), or delete the old checkpoint first."
        )
    if occupied:
        raise CheckpointExistsError(
            f"{final} exists and is neither an empty directory nor a checkpoint. Fix: choose "
            "another path, or remove that directory."
        )


def _agree_on_tmp(s: _Save) -> str:
    """The temporary directory process 0 picked; every process must be saving to ``s.final``."""

    def pick() -> str:  # process 0 only
        refused = None
        if s.sync.multi:  # the others would see process 0's save in progress there
            try:
                _check_free(s.final)
            except CheckpointExistsError as e:
                refused = str(e)
        return json.dumps([s.final, _storage.at(s.final).temporary().root, refused])

    final, tmp, refused = json.loads(s.sync.share("tmp", pick))
    if refused:
        raise CheckpointExistsError(refused)
    if final != s.final:
        raise CheckpointError(  # not a CoordinationError: it is reported to the other processes
            f"jaxckpt: process {_multihost.process_index()} saves to {s.final} while process 0 "
            f"saves to {final}. Every process must call save with the same path, in the same "
            "order. Fix: derive the path from a value all processes share, such as the step."
        )
    return tmp


def _check_shared(tmp: str, final: str) -> None:
    """The directory process 0 made must be visible to every process: the storage is shared."""
    if _storage.at(tmp).is_dir():
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
    lock = None
    begun = False  # the directory exists for this process: its loss is reported as such
    try:
        _complete(s)
        tmp = _agree_on_tmp(s)
        states = {p: r["v"] for p, r in _metadata.iter_leaves(s.record) if r["t"] == "state"}
        if states:
            s.sync.post("states", json.dumps(states))
        if primary:
            lock = _storage.at(tmp).begin()
        s.sync.barrier("start")
        if not primary:
            _check_shared(tmp, s.final)
        elif states and s.sync.multi:
            _keep_every_state(s, states)
        begun = True
        linker = s.inc.linker(tmp) if s.inc is not None else None
        with _progress.shown(f"save {s.final}", lambda: _save_bytes(s)):
            _write.write_arrays(tmp, s.arrays, s.packs, budget, linker)
        if s.inc is not None:
            s.inc.finish(s.arrays)
        s.time = time.time()
        written = _write.written_keys(s.arrays, s.packs, primary)
        if primary:
            record, moved = _split.split(s.record)
            attrs = _metadata.root_attributes(record, {"time": s.time, **s.extra})
            files = {"zarr.json": _arrays.group_json(attrs)}
            files.update(_write.group_files(s.record, moved))
            if s.packs:
                files[f"{_write.PACK_DIR}/zarr.json"] = _arrays.group_json()
            _write.write_json_files(tmp, files)
            written += list(files)
        _write.durable(tmp)
        _check_written(tmp, s.final, written, primary)
        s.sync.barrier("written")
        if primary:
            _storage.at(tmp).write_durable(
                _storage.COMMIT, _commit.commit_bytes(files, s.arrays, s.packs)
            )
            try:
                _storage.at(tmp).commit(_storage.at(s.final))
            except OSError:
                _check_free(s.final)  # another save got there first: say so plainly
                raise
        s.sync.barrier("committed")
        if s.inc is not None:
            s.inc.committed()
    except BaseException as e:
        if s.inc is not None:
            s.inc.failed()
        error = _storage.save_error(s.final, e)
        s.sync.abandon(error)
        gone = begun and primary and isinstance(error, CheckpointError)
        gone = gone and tmp is not None and not _storage.at(tmp).is_dir()
        if primary and tmp is not None:
            _storage.at(tmp).delete()
        if gone:
            raise _lost(s.final, f"its directory {tmp}") from e
        if error is e:
            raise
        raise error from e
    finally:
        if lock is not None:
            lock.release()
    return s.final


def _save_bytes(s: _Save) -> int:
    """The bytes this process writes for ``s``."""
    return sum(p.nbytes for a in s.arrays for p in a.pieces) + sum(k.nbytes for k in s.packs)


def _check_written(tmp: str, final: str, written: list[str], primary: bool) -> None:
    """Nothing is committed over missing data: every file this process wrote is still there.

    A directory gone altogether, on a process other than 0, was removed by process 0 giving up
    on the save: the barrier that follows says why.
    """
    store = _storage.at(tmp)
    lost = store.missing(written)
    if lost and (primary or store.is_dir()):
        example = _storage.join(tmp, lost[0])
        raise _lost(final, f"{len(lost)} of the {len(written)} files it wrote (e.g. {example})")


def _lost(final: str, what: str) -> StorageError:
    error = StorageError(
        f"The save to {final} lost {what} before its commit: something else deleted the save's "
        "files while it was writing. Nothing was committed; earlier checkpoints are intact. "
        "Fix: save again, and stop whatever deletes a save's temporary files while it writes."
    )
    error.errno = errno.ENOENT  # str(error) stays the sentence
    return error


class SaveHandle:
    """A save in flight: ``wait()`` returns the final path or raises the save's error."""

    def __init__(self, save: _Save, held: int, on_device: list[_write.Piece]):
        self.path = save.final
        self.time = 0.0  # when it was written, as its metadata says; set once it is committed
        self._error: BaseException | None = None
        self._seen = False
        # A worker of a pool, not a thread of its own: starting a thread waits until it runs,
        # which the caller would wait for while an earlier save's threads are busy.
        with _runtime.order:
            self._after, _runtime.last = _runtime.last, self
            self._future = _runtime.pool("save").submit(self._run, save, held, on_device)

    def _run(self, save: _Save, held: int, on_device: list[_write.Piece]) -> None:
        try:
            _snapshot.fetch(on_device, save.buffers)  # under way before any earlier save ends
            on_device.clear()
            if self._after is not None:  # writes go one save at a time, in call order
                futures.wait([self._after._future])
                self._after = None
            _execute(save, budget=1 << 62)
            self.time = save.time
        except BaseException as e:  # surfaced by wait(), the next save, or a manager's close()
            self._error = e
        finally:
            save.arrays, save.packs = [], []  # nothing refers to the snapshot's buffers now
            _runtime.give_buffers(save.buffers)
            save.buffers = []
            _runtime.release(held)

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed)."""
        return self._future.done()

    def exception(self) -> BaseException | None:
        """The error the save ended with; None while it runs or once it has committed."""
        return self._error if self._future.done() else None

    def add_done_callback(self, fn: Callable[[SaveHandle], Any]) -> None:
        """Calls ``fn(handle)`` once the save has ended, committed or failed (at once if it has
        ended), on the thread that ended it."""
        self._future.add_done_callback(lambda _: fn(self))

    def wait(self, timeout: float | None = None) -> str:
        """Blocks until the save is committed; returns its path or raises its error."""
        futures.wait([self._future], timeout)
        if not self._future.done():
            raise TimeoutError(f"the save to {self.path} is still running after {timeout} s")
        _runtime.unfinished.discard(self)
        if self._error is not None:
            self._seen = True
            raise self._error
        return self.path

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"SaveHandle({self.path!r}, {state})"


def _finish_at_exit() -> None:
    """A script that ends with saves in flight still commits them (or says why not)."""
    for h in list(_runtime.unfinished):
        try:
            h.wait()
        except BaseException as e:  # noqa: BLE001 - reported, the interpreter is exiting
            print(f"jaxckpt: the asynchronous save to {h.path} failed: {e}", file=sys.stderr)


_runtime.at_exit(_finish_at_exit)


def _raise_earlier_errors() -> None:
    """An async save's error nobody waited for is raised by the next save."""
    for h in list(_runtime.unfinished):
        if h.done():
            _runtime.unfinished.discard(h)
            if h._error is not None and not h._seen:
                h._seen = True
                raise CheckpointError(
                    f"An earlier asynchronous save to {h.path} failed: "
                    f"{str(h._error).rstrip('.')}. Its checkpoint was not written; this save did "
                    "not start. Fix: resolve the cause and save again."
                ) from h._error


@logged_save
def save(
    path: str | os.PathLike[str],
    tree: PyTree,
    *,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
    base: str | os.PathLike[str] | None = None,
    _hashing: bool = False,
) -> str:
    """Saves ``tree`` to the directory ``path``, atomically; returns the final path.

    The save streams: arrays already in host memory are written from where they are, device
    arrays are copied to the host at most ``_write.STREAM_BYTES`` at a time. It is durable (fsynced)
    when it returns.

    With ``base``, the path of an earlier checkpoint this process saved on the same local
    disk, the chunks unchanged since are hard-linked from it instead of written (see
    docs/manager.md, "Incremental saves"); ``path`` is still a complete checkpoint.

    Example:
        >>> jc.save("/tmp/ckpt-1", {"w": np.ones(3)})  # doctest: +SKIP
        '/tmp/ckpt-1'
    """
    _raise_earlier_errors()
    s = _prepare(path, tree, extra_attributes(step, metrics), base, _hashing)
    return _execute(s, budget=_write.STREAM_BYTES)


@logged_save_async
def save_async(
    path: str | os.PathLike[str],
    tree: PyTree,
    *,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
    base: str | os.PathLike[str] | None = None,
    _hashing: bool = False,
) -> SaveHandle:
    """Snapshots ``tree``, then saves it in the background.

    Returns once the snapshot is taken: the caller may then donate, delete or mutate its
    arrays. The snapshot is a host copy, except for arrays on an accelerator with room for
    them twice over: those are copied in the device's own memory, and moved to the host in
    the background (see docs/speed.md). ``handle.wait()`` blocks until the checkpoint is
    committed and raises the save's error, if any; an error nobody waited for is raised by
    the next save. Saves in flight write one at a time, in call order, so they commit in
    that order. While the snapshots of saves in flight would exceed
    :func:`jaxckpt.runtime.async_host_bytes`, this call first waits for older saves to finish.
    ``base`` is as for :func:`save`; it may be a save still in flight (its commit is awaited
    before anything is linked), and a leaf linked from it is not snapshotted.
    """
    _raise_earlier_errors()
    with _runtime.writes_paused():  # the caller waits: earlier saves' writes leave it the CPU
        s = _prepare(path, tree, extra_attributes(step, metrics), base, _hashing)
    held = _snapshot.snapshot_bytes(s.arrays, s.packs)
    # The most the snapshot can hold; what its zero pieces do not is given back below.
    _runtime.reserve(held)
    try:
        with _runtime.writes_paused():
            on_device = _snapshot.copy_on_device(s.arrays)
            s.buffers = _snapshot.snapshot(s.arrays, s.packs, skip=on_device)
    except BaseException:
        _runtime.release(held)
        raise
    kept = _snapshot.snapshot_bytes(s.arrays, s.packs)
    _runtime.release(held - kept)
    h = SaveHandle(s, kept, on_device)
    _runtime.unfinished.add(h)
    return h


def extra_attributes(step: int | None, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The root attributes a save adds for ``step`` and ``metrics`` (metrics as JSON values)."""
    out: dict[str, Any] = {}
    if step is not None:
        out["step"] = check_step(step)
    checked = check_metrics(metrics)
    if checked:
        out["metrics"] = checked
    return out


def check_step(step: Any) -> int:
    """``step`` as an int; a step is a non-negative integer (a Python, NumPy or JAX one)."""
    try:
        value = operator.index(step)  # an integer, not a float that would be truncated
    except TypeError:
        value = None
    if value is None or isinstance(step, (bool, np.bool_)):
        raise TypeError(
            f"step must be a non-negative int, not {step!r} ({type(step).__name__}). Fix: pass "
            "the step as an integer count (checkpoints are named and ordered by it)."
        )
    if value < 0:
        raise ValueError(f"step must be a non-negative int, not {value}. Fix: count steps from 0.")
    return value


def check_metrics(metrics: Any) -> dict[str, int | float | bool]:
    """``metrics`` as JSON values: a dict of names to real scalars (Python, NumPy or JAX
    ones). NaN and infinities are kept: a diverging run still saves (NaN ranks last)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics must be a dict of names to numbers, not {metrics!r} "
            f"({type(metrics).__name__}). Fix: name each value, e.g. metrics={{'loss': loss}}."
        )
    out: dict[str, int | float | bool] = {}
    for name, v in metrics.items():
        if not isinstance(name, str):
            raise TypeError(
                f"metric names must be str, not {name!r} ({type(name).__name__}). Fix: use "
                "names such as 'loss'."
            )
        a = np.asarray(v)
        integer = a.dtype.kind in "biu"
        if not (integer or jax.dtypes.issubdtype(a.dtype, np.floating)):  # bfloat16 too
            raise TypeError(
                f"The metric {name!r} is {v!r} ({type(v).__name__}); a metric is one real "
                "number (int, float, bool, or a NumPy or JAX scalar). Fix: pass a number, or "
                "save other values in the tree."
            )
        if a.shape != ():
            raise ValueError(
                f"The metric {name!r} is an array of shape {a.shape}; a metric is one number. "
                "Fix: reduce it to one, e.g. float(x.mean()), or save the array in the tree."
            )
        out[name] = a.item() if integer else a.astype(np.float64).item()
    return out
