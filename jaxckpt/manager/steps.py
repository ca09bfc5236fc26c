"""The steps of a run's directory as a manager reads them: the committed ``ckpt-<step>``
checkpoints (the truth) described by the index where it agrees with them, the steps another
library (Orbax) wrote there, what saves that never committed left behind, and the restore of
one step that another process may retire meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from jaxckpt import storage as _storage
from jaxckpt.checkpoint import restore as _restore
from jaxckpt.checkpoint.reader import Reader
from jaxckpt.errors import CheckpointError, CheckpointNotFoundError
from jaxckpt.format import run as _run
from jaxckpt.interop import foreign

PyTree = Any
log = logging.getLogger("jaxckpt")


def latest_checkpoint(directory: str | os.PathLike[str]) -> str | None:
    """The path of the newest committed checkpoint in ``directory``, or None: a jaxckpt
    ``ckpt-<step>``, or a step another library (Orbax) wrote there, as a
    :class:`CheckpointManager` of the directory lists them (its own checkpoint first, for a
    step both have).

    Example:
        >>> path = jc.latest_checkpoint("./tf_ckpts")  # doctest: +SKIP
        './tf_ckpts/ckpt-100'
    """
    steps = _run.committed_steps(os.fspath(directory))
    others = foreign.run_steps(os.fspath(directory))
    newest = max((*steps, *others), default=None)
    if newest is None:
        return None
    if newest in others and newest not in steps:
        return others[newest]
    return _storage.join(directory, _run.step_name(newest))


@dataclasses.dataclass
class Steps:
    """What :func:`load` found in a run's directory."""

    entries: dict[int, _run.Entry]  # the manager's own committed steps
    # Steps another library (Orbax) wrote here: listed and restored, never written nor deleted;
    # retention and the index count only the manager's own.
    foreign: dict[int, str]
    # Steps described by the index alone: checked against the checkpoints' own metadata before
    # retention deletes anything on what the index says (check_index).
    unchecked: set[int]
    stale: bool  # the index disagrees with the committed steps (or is missing)


def load(directory: str) -> Steps:
    """The committed steps, described by the index where it agrees with them."""
    index = _run.read_index(directory)
    if index.problem is not None:
        log.log(
            logging.INFO if index.legacy else logging.WARNING,
            "jaxckpt: rebuilding the index %s/%s from the checkpoints: %s",
            directory,
            _run.INDEX,
            index.problem,
        )
    others = foreign.run_steps(directory)
    entries = {}
    unchecked = set()
    for step in _run.committed_steps(directory):
        if step in index.entries:
            entries[step] = index.entries[step]
            unchecked.add(step)
        else:
            path = _storage.join(directory, _run.step_name(step))
            entries[step] = entry_from_metadata(path, step)
    stale = index.entries.keys() != entries.keys() or not index.entries
    return Steps(entries, others, unchecked, stale)


def entry_from_metadata(path: str, step: int) -> _run.Entry:
    """What the checkpoint at ``path`` says of its step (a warning and no metrics where it
    cannot be read)."""
    try:
        meta = Reader(path).metadata
    except CheckpointError as e:
        log.warning("jaxckpt: %s", e)
        return _run.Entry(step, 0.0, {})
    return _run.Entry(step, float(meta.get("time", 0.0)), dict(meta.get("metrics", {})))


def check_index(directory: str, entries: dict[int, _run.Entry], unchecked: set[int]) -> None:
    """Replaces what the index says of each step it alone described (``unchecked``, emptied)
    by what the step's own (checksummed) metadata says, with a warning where they differ."""
    for step in sorted(unchecked & entries.keys()):
        truth = entry_from_metadata(_storage.join(directory, _run.step_name(step)), step)
        if truth.as_json() != entries[step].as_json():
            log.warning(
                "jaxckpt: the index %s/%s says step %d has time %r and metrics %r, but its "
                "checkpoint says %r and %r; the checkpoint's are used.",
                directory,
                _run.INDEX,
                step,
                entries[step].time,
                entries[step].metrics,
                truth.time,
                truth.metrics,
            )
            entries[step] = truth
    unchecked.clear()


def remove_debris(directory: str, store: _storage.Store) -> None:
    """Removes what saves that never committed left behind in the run's ``directory`` (its
    ``store``), once their writers are gone (a save in progress, of this process or another,
    is left alone); nothing else."""
    for name in store.names():
        path = _storage.join(directory, name)
        child = store.child(name)
        uncommitted = _run.step_of(name) is not None and not child.is_committed()
        if not (_storage.is_debris(name) or (uncommitted and child.is_dir())):
            continue
        if child.remove_if_abandoned():
            log.info("jaxckpt: removed %s, left by a save that never committed", path)
        else:
            log.info("jaxckpt: left %s alone: a save in progress writes there", path)


def restore(
    path: str, step: int, is_foreign: bool, target: PyTree, kwargs: dict[str, Any]
) -> PyTree:
    """``jc.restore(path, target, **kwargs)`` of the run's ``step``; where the checkpoint
    vanished meanwhile (another process's manager retired it), an error that says so."""
    try:
        return _restore.restore(path, target, **kwargs)
    except (CheckpointError, OSError) as e:
        if _storage.at(path).is_committed() or is_foreign:
            raise
        raise CheckpointNotFoundError(
            f"Step {step} ({path}) was deleted while it was being restored: another "
            "process's manager retired it (retention). Fix: mngr.reload() and restore a "
            "newer step, e.g. the latest."
        ) from e
