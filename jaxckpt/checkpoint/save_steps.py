"""The steps of one save, as ``save`` and ``save_async`` (:mod:`jaxckpt.checkpoint.save`) run
them: ``prepare`` plans the tree; ``execute`` writes every array's pieces and the metadata,
then commits.

``COMMIT`` is written last and, on a local disk, the temporary sibling directory is renamed
into place (the storage layer's commit protocol, :mod:`jaxckpt.storage.base`). In a
multi-process job every process runs the same steps, with barriers between them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxckpt import progress as _progress
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import incremental as _incremental
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.checkpoint import plan_cache as _plan_cache
from jaxckpt.checkpoint import snapshot as _snapshot
from jaxckpt.checkpoint import write as _write
from jaxckpt.errors import CheckpointError, CheckpointExistsError, StorageError
from jaxckpt.format import commit as _commit
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import split as _split
from jaxckpt.format.metadata import Record
from jaxckpt.storage import arrays as _arrays

PyTree = Any


@dataclasses.dataclass
class Save:
    final: str
    record: Record  # empty until ``bind`` ran (a plan from a kept template)
    arrays: list[_plan.Array]
    packs: list[_plan.Pack]
    extra: dict[str, Any]
    sync: _multihost.SaveSync
    buffers: list[np.ndarray] = dataclasses.field(default_factory=list)  # an async snapshot's
    time: float = 0.0  # when it was written, as its metadata says
    inc: _incremental.Save | None = None  # what it links from its base, and records
    bind: Callable[[], Record] | None = None  # makes ``record`` (_plan_cache.Plan)


def prepare(
    path: str | os.PathLike[str],
    tree: PyTree,
    extra: dict[str, Any],
    base: str | os.PathLike[str] | None = None,
    hashing: bool = False,
) -> Save:
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
    return Save(final, p.record or {}, p.arrays, p.packs, extra, sync, inc=inc, bind=p.bind)


def _complete(s: Save) -> None:
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


def _agree_on_tmp(s: Save) -> str:
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


def _keep_every_state(s: Save, states: dict[str, str]) -> None:
    """On process 0: a state leaf that differs between processes keeps each one's state."""
    every = [json.loads(v) for v in s.sync.collect("states", json.dumps(states))]
    for path, rec in _metadata.iter_leaves(s.record):
        if rec["t"] == "state":
            per = [d.get(path, rec["v"]) for d in every]
            if len(set(per)) > 1:
                rec["per_process"] = per


@dataclasses.dataclass
class _Attempt:
    """How far this process's run of a save got: what a failure must clean up."""

    primary: bool  # process 0: it makes, commits, or removes the temporary directory
    tmp: str | None = None  # the temporary directory, once every process agreed on it
    lock: Any = None  # process 0's hold on it, once begun
    begun: bool = False  # the directory exists for this process: its loss is reported as such


def execute(s: Save, budget: int) -> str:
    """Writes, then commits; in a multi-process job every process runs this together.

    Each process writes its own shards; process 0 also writes the metadata, and the ``COMMIT``
    only once every process has passed the ``written`` barrier.
    """
    at = _Attempt(_multihost.is_primary())
    try:
        tmp = _begin(s, at)
        files = _write_all(s, tmp, at.primary, budget)
        _commit_save(s, tmp, at.primary, files)
    except BaseException as e:
        error = _abandon(s, at, e)
        if error is e:
            raise
        raise error from e
    finally:
        if at.lock is not None:
            at.lock.release()
    return s.final


def _begin(s: Save, at: _Attempt) -> str:
    """Every process agrees on the temporary directory, which process 0 makes (and locks);
    returns it."""
    _complete(s)
    at.tmp = tmp = _agree_on_tmp(s)
    states = {p: r["v"] for p, r in _metadata.iter_leaves(s.record) if r["t"] == "state"}
    if states:
        s.sync.post("states", json.dumps(states))
    if at.primary:
        at.lock = _storage.at(tmp).begin()
    s.sync.barrier("start")
    if not at.primary:
        _check_shared(tmp, s.final)
    elif states and s.sync.multi:
        _keep_every_state(s, states)
    at.begun = True
    return tmp


def _write_all(s: Save, tmp: str, primary: bool, budget: int) -> dict[str, Any]:
    """Writes this process's arrays (and, on process 0, the metadata files), makes them
    durable and checks they are all still there; returns the metadata files written."""
    linker = s.inc.linker(tmp) if s.inc is not None else None
    with _progress.shown(f"save {s.final}", lambda: _save_bytes(s)):
        _write.write_arrays(tmp, s.arrays, s.packs, budget, linker)
    if s.inc is not None:
        s.inc.finish(s.arrays)
    s.time = time.time()
    written = _write.written_keys(s.arrays, s.packs, primary)
    files: dict[str, Any] = {}
    if primary:
        files = _metadata_files(s)
        _write.write_json_files(tmp, files)
        written += list(files)
    _write.durable(tmp)
    _check_written(tmp, s.final, written, primary)
    return files


def _metadata_files(s: Save) -> dict[str, Any]:
    """The root ``zarr.json`` (the structure record, split over group files if big) and every
    group's."""
    record, moved = _split.split(s.record)
    attrs = _metadata.root_attributes(record, {"time": s.time, **s.extra})
    files = {"zarr.json": _arrays.group_json(attrs)}
    files.update(_write.group_files(s.record, moved))
    if s.packs:
        files[f"{_plan.PACK_DIR}/zarr.json"] = _arrays.group_json()
    return files


def _commit_save(s: Save, tmp: str, primary: bool, files: dict[str, Any]) -> None:
    """Once every process has written: process 0 writes ``COMMIT`` and commits."""
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


def _abandon(s: Save, at: _Attempt, e: BaseException) -> BaseException:
    """Gives up a failed save (process 0 removes its temporary directory); returns the error
    to raise for ``e``: ``e`` itself, or a sentence saying what went wrong."""
    if s.inc is not None:
        s.inc.failed()
    error = _storage.save_error(s.final, e)
    s.sync.abandon(error)
    gone = at.begun and at.primary and isinstance(error, CheckpointError)
    gone = gone and at.tmp is not None and not _storage.at(at.tmp).is_dir()
    if at.primary and at.tmp is not None:
        _storage.at(at.tmp).delete()
    if gone:
        return _lost(s.final, f"its directory {at.tmp}")
    return error


def _save_bytes(s: Save) -> int:
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
