"""Many checkpoints of one run: ``CheckpointManager`` and ``latest_checkpoint``.

A manager's directory holds one checkpoint per saved step, ``ckpt-<step>``, and an index file,
``checkpoint`` (JSON: each step's path, time and metrics), rewritten atomically after every
change. The committed step directories are the truth: a missing or stale index is rebuilt from
them. Every filesystem operation goes through :mod:`jaxckpt._storage`.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import itertools
import logging
import math
import operator
import os
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import restore as _restore
from jaxckpt.checkpoint import save as _checkpoint
from jaxckpt.checkpoint.reader import Reader
from jaxckpt.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from jaxckpt.format import run as _run
from jaxckpt.interop import foreign
from jaxckpt.local_tier import tier as _local_tier
from jaxckpt.log import logged_deletion, logged_retention

PyTree = Any
log = logging.getLogger("jaxckpt")
_serial = itertools.count()  # every process creates its managers in the same order


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
class _Pending:
    step: int
    path: str
    handle: _checkpoint.SaveHandle
    metrics: dict[str, Any]  # as its metadata holds them


class CheckpointManager:
    """Saves a run's checkpoints as ``directory/ckpt-<step>`` and keeps the ones asked for.

    Retention, after each committed save, keeps the newest ``max_to_keep`` (None: all; with
    ``best_metric``, the best ``max_to_keep`` by ``metrics[best_metric]`` and the newest), every
    multiple of ``keep_every_n_steps``, and with ``keep_every_n_hours`` the oldest checkpoint and
    then the first one at least that many hours after the last one kept so. With ``async_save``
    a save commits in the background; its retention (or error) comes with the next ``save``,
    ``restore``, ``wait_until_finished`` or ``close``. On several processes all call the same
    methods at the same steps; process 0 alone deletes and writes the index. With
    ``incremental`` (the default) a save on a local disk hard-links the chunks unchanged since
    the manager's previous save instead of writing them again. With ``local_directory``, a
    local tier saves every ``local_save_interval_steps`` to each host's own disk, each
    process's part replicated to ``peer_replicas`` processes on other hosts, keeping
    ``local_max_to_keep`` steps; a restart restores the newest step that survived whole
    (docs/multihost.md, "Surviving a lost host"). See docs/manager.md.

    Example:
        >>> with jc.CheckpointManager("./tf_ckpts", max_to_keep=3) as mngr:  # doctest: +SKIP
        ...     if mngr.latest_step is not None:
        ...         state = mngr.restore(target=state)
        ...     mngr.save(step, state, metrics={"loss": loss})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 3,
        keep_every_n_steps: int | None = None,
        keep_every_n_hours: float | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        save_interval_steps: int = 1,
        async_save: bool = True,
        read_only: bool = False,
        incremental: bool = True,
        local_directory: str | os.PathLike[str] | None = None,
        local_save_interval_steps: int = 1,
        local_max_to_keep: int = 2,
        peer_replicas: int = 1,
    ):
        _check_count("max_to_keep", max_to_keep, none_ok=True)
        _check_count("keep_every_n_steps", keep_every_n_steps, none_ok=True)
        _check_count("save_interval_steps", save_interval_steps, none_ok=False)
        _local_tier.check(local_save_interval_steps, local_max_to_keep, peer_replicas)
        if keep_every_n_hours is not None and not keep_every_n_hours > 0:
            raise ValueError(
                f"keep_every_n_hours must be a positive number of hours or None, not "
                f"{keep_every_n_hours!r}."
            )
        if best_mode not in ("min", "max"):
            raise ValueError(f'best_mode must be "min" or "max", not {best_mode!r}.')
        self.directory = os.fspath(directory)
        self._store = _storage.at(self.directory)
        if self._store.is_committed():
            raise CheckpointError(
                f"{self.directory} is a checkpoint (it holds {_storage.COMMIT}), not a directory "
                "of checkpoints: a manager would write its checkpoints inside it. Fix: give the "
                "manager the run's directory (the one holding ckpt-<step> checkpoints), or read "
                f"this checkpoint with jc.restore({self.directory!r})."
            )
        self.max_to_keep = max_to_keep
        self.keep_every_n_steps = keep_every_n_steps
        self.keep_every_n_hours = keep_every_n_hours
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.save_interval_steps = save_interval_steps
        self.async_save = async_save
        self.read_only = read_only
        self.incremental = bool(incremental)
        self._last: str | None = None  # the path of this manager's previous save (a base)
        self._primary = _multihost.is_primary()
        self._pending: collections.deque[_Pending] = collections.deque()  # in save order
        # With async_save, deleted checkpoints' files and index rewrites go on one worker, in
        # order: on a disk busy with a save, an index rewrite inside a save call held it up.
        self._background: collections.deque[tuple[str, Future[None]]] = collections.deque()
        self._writer: weakref.finalize | None = None  # releases the run's writer lock
        self._unwritable: OSError | None = None  # why a directory we cannot write is read-only
        if self._primary and not read_only:
            self._store.make_dirs()  # a new run on a disk it cannot write: an error
            self._writing(self._remove_debris)
        self._barrier = f"jaxckpt-manager-{next(_serial)}"  # a barrier name is used once
        self._commits = itertools.count()
        _multihost.barrier(f"{self._barrier}-start", what="the manager", where=self.directory)
        self._entries, stale = self._load()
        if stale and self._primary and not self.read_only:
            self._writing(self._write_index, True)
        self._local = None  # the local tier (docs/multihost.md, "Surviving a lost host")
        if local_directory is not None and not read_only:
            self._local = _local_tier.LocalTier(
                local_directory,
                local_save_interval_steps,
                local_max_to_keep,
                peer_replicas,
                async_save,
                self._barrier,
            )
        # At interpreter exit its last saves still commit (a manager's hook runs before the
        # saves' own: hooks run in reverse order of registration).
        _runtime.at_exit(_finish_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------------ reading state

    def checkpoint_path(self, step: int) -> str:
        """Where the checkpoint of ``step`` is (or would be) in this run: ``DIR/ckpt-<step>``,
        or the step directory another library (Orbax) wrote for it."""
        if step in self._foreign and step not in self._entries:
            return self._foreign[step]
        return _storage.join(self.directory, _run.step_name(step))

    def _writing(self, fn: Callable[..., Any], *args: Any) -> None:
        """Runs a write of the manager's own; a directory that refuses it (a read-only copy of
        a run) makes the manager read-only instead of failing."""
        try:
            fn(*args)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            log.info("jaxckpt: %s cannot be written (%s): opened read-only", self.directory, e)
            self.read_only, self._unwritable = True, e

    def _hold_writer(self) -> None:
        """Becomes the run's one writer, or raises at once (see docs/manager.md)."""
        try:
            key = self._store.hold_writer()
        except OSError as e:  # the save itself meets the cause and reports it; retried then
            log.debug("jaxckpt: no writer lock on %s (%s)", self.directory, e)
            return
        if key is not None:  # also released if the manager is dropped without close()
            self._writer = weakref.finalize(self, self._store.release_writer, key)

    def reload(self) -> None:
        """Reads the directory again: the steps another process (the trainer, for an
        evaluation job's read-only manager) committed or deleted since."""
        self._entries, _ = self._load()

    def _remove_debris(self) -> None:
        """Removes what saves that never committed left behind, once their writers are gone
        (a save in progress, of this process or another, is left alone); nothing else."""
        for name in self._store.names():
            path = _storage.join(self.directory, name)
            store = self._store.child(name)
            uncommitted = _run.step_of(name) is not None and not store.is_committed()
            if not (_storage.is_debris(name) or (uncommitted and store.is_dir())):
                continue
            if store.remove_if_abandoned():
                log.info("jaxckpt: removed %s, left by a save that never committed", path)
            else:
                log.info("jaxckpt: left %s alone: a save in progress writes there", path)

    def _load(self) -> tuple[dict[int, _run.Entry], bool]:
        """The committed steps, described by the index where it agrees with them."""
        index = _run.read_index(self.directory)
        if index.problem is not None:
            log.log(
                logging.INFO if index.legacy else logging.WARNING,
                "jaxckpt: rebuilding the index %s/%s from the checkpoints: %s",
                self.directory,
                _run.INDEX,
                index.problem,
            )
        # Steps another library (Orbax) wrote here: listed and restored, never written nor
        # deleted; retention and the index count only the manager's own.
        self._foreign: dict[int, str] = foreign.run_steps(self.directory)
        entries = {}
        # Steps described by the index alone: checked against the checkpoints' own metadata
        # before retention deletes anything on what the index says (_check_index).
        self._unchecked: set[int] = set()
        for step in _run.committed_steps(self.directory):
            if step in index.entries:
                entries[step] = index.entries[step]
                self._unchecked.add(step)
            else:
                entries[step] = self._entry_from_metadata(step)
        return entries, index.entries.keys() != entries.keys() or not index.entries

    def _check_index(self) -> None:
        """Replaces what the index says of each step it alone described by what the step's own
        (checksummed) metadata says, with a warning where they differ."""
        for step in sorted(self._unchecked & self._entries.keys()):
            truth = self._entry_from_metadata(step)
            if truth.as_json() != self._entries[step].as_json():
                log.warning(
                    "jaxckpt: the index %s/%s says step %d has time %r and metrics %r, but its "
                    "checkpoint says %r and %r; the checkpoint's are used.",
                    self.directory,
                    _run.INDEX,
                    step,
                    self._entries[step].time,
                    self._entries[step].metrics,
                    truth.time,
                    truth.metrics,
                )
                self._entries[step] = truth
        self._unchecked.clear()

    def _entry_from_metadata(self, step: int) -> _run.Entry:
        try:
            meta = Reader(self.checkpoint_path(step)).metadata
        except CheckpointError as e:
            log.warning("jaxckpt: %s", e)
            return _run.Entry(step, 0.0, {})
        return _run.Entry(step, float(meta.get("time", 0.0)), dict(meta.get("metrics", {})))

    def _write_index(self, now: bool = False) -> None:
        """Rewrites the index: at once with ``now``, else as :meth:`_in_background` does."""
        index = _run.index_bytes([self._entries[s] for s in sorted(self._entries)])
        if now:
            self._store.write_atomic(_run.INDEX, index)
        else:
            what = f"rewriting its index {self.directory}/{_run.INDEX}"
            self._in_background(what, self._store.write_atomic, _run.INDEX, index)

    def _in_background(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Runs ``fn(*args)`` after what the manager's worker already has, with ``async_save``;
        else now."""
        if self.async_save:
            self._background.append((what, _runtime.pool("manager").submit(fn, *args)))
        else:
            fn(*args)

    def _reap(self, wait: bool) -> None:
        """Forgets the background work that finished (with ``wait``, all of it, once done);
        raises its first error."""
        while self._background and (wait or self._background[0][1].done()):
            what, done = self._background.popleft()
            try:
                done.result()
            except Exception as e:
                raise CheckpointError(
                    f"The manager of {self.directory} failed {what}: {str(e).rstrip('.')}. Its "
                    "committed checkpoints are intact, and a stale index is rebuilt from them. "
                    "Fix: remove the cause (disk space, permissions); the next save rewrites the "
                    "index."
                ) from e

    @property
    def steps(self) -> list[int]:
        """The committed steps, oldest first (a save still in flight is not among them), with
        the steps another library (Orbax) wrote in the directory."""
        return sorted({*self._entries, *self._foreign})

    @property
    def latest_step(self) -> int | None:
        """The newest step restorable: from the persistent tier (with the steps another library
        wrote in the directory) or the local one."""
        local = self._local.latest if self._local is not None else None
        steps = [*self._entries, *self._foreign, *([local] if local is not None else [])]
        return max(steps, default=None)

    @property
    def checkpoints(self) -> list[str]:
        """The paths of the committed checkpoints, oldest first."""
        return [self.checkpoint_path(s) for s in self.steps]

    @property
    def latest_checkpoint(self) -> str | None:
        """The path of the newest checkpoint in ``directory`` (the persistent tier), or None."""
        step = max((*self._entries, *self._foreign), default=None)
        return None if step is None else self.checkpoint_path(step)

    @property
    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (None without a metric or checkpoints)."""
        ranked = self._ranked()
        return ranked[0] if ranked else None

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics saved with ``step``."""
        return dict(self._entry(step).metrics)

    def _entry(self, step: int) -> _run.Entry:
        if step not in self._entries and step in self._foreign:
            return foreign.run_entry(step, self._foreign[step])
        if step not in self._entries:
            raise CheckpointNotFoundError(
                f"Step {step} has no committed checkpoint in {self.directory}; its steps are "
                f"{self.steps}. Fix: pick one of those steps, or step=None for the latest."
            )
        return self._entries[step]

    # ------------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` saves without ``force``: ``step`` is a multiple of
        ``save_interval_steps`` and newer than every step saved or being saved (so a loop
        resumed at a saved step does not save it again), or the same holds for the local
        tier's ``local_save_interval_steps`` and steps."""
        step = _checkpoint.check_step(step)
        return self._persistent_due(step) or (
            self._local is not None and self._local.due(step, force=False)
        )

    def _persistent_due(self, step: int) -> bool:
        newest = max([*self.steps, *(p.step for p in self._pending)], default=-1)
        return step > newest and step % self.save_interval_steps == 0

    def save(
        self, step: int, tree: PyTree, metrics: dict[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Saves ``tree`` as ``step`` unless ``should_save(step)`` says no and not ``force``.

        Returns whether it saved. ``step`` is a non-negative int; ``metrics`` a dict of names to
        real scalars (NaN and infinities included). With ``force`` a step already saved is an
        error (``CheckpointExistsError``). With ``async_save`` it returns once the arrays are
        snapshotted: earlier saves still writing go on in the background (on several processes,
        it first waits for them to commit); an earlier asynchronous save's error is raised here.
        """
        step = _checkpoint.check_step(step)
        if metrics is not None and not isinstance(metrics, Mapping):
            _checkpoint.check_metrics(metrics)  # raises; values are checked only when saving
        if self.read_only:
            why = f" ({self._unwritable})" if self._unwritable else ""
            raise CheckpointError(
                f"This manager of {self.directory} is read-only{why}: it restores, it does not "
                "save. Fix: open the manager without read_only=True on a directory it can write."
            )
        single = _multihost.process_count() == 1
        if single:  # on several processes only at points every process shares
            self._finish_pending(only_done=True)
        self._reap(wait=False)
        if not force and not self.should_save(step):
            return False
        local = self._local if self._local is not None and self._local.due(step, force) else None
        if local is not None and not (force or self._persistent_due(step)):
            local.save(step, tree, _checkpoint.check_metrics(metrics))
            return True
        if not single:
            self.wait_until_finished()
        if step in self._entries or any(p.step == step for p in self._pending):
            raise CheckpointExistsError(
                f"Step {step} is already saved (or being saved) in {self.directory} "
                f"({self.checkpoint_path(step)}); a manager never overwrites a checkpoint. Fix: save under "
                "a new step, or restore from this one to continue the run."
            )
        as_saved = _checkpoint.check_metrics(metrics)
        if self._writer is None and self._primary:
            self._hold_writer()
        path = self.checkpoint_path(step)
        base, hashing = (self._last, True) if self.incremental else (None, False)
        self._last = path  # the base of the next save, even while this one is in flight
        if self.async_save:
            handle = _checkpoint.save_async(
                path, tree, step=step, metrics=as_saved, base=base, _hashing=hashing
            )
            self._pending.append(_Pending(step, path, handle, as_saved))
        else:
            _checkpoint.save(path, tree, step=step, metrics=as_saved, base=base, _hashing=hashing)
            self._committed(self._entry_from_metadata(step))
        if local is not None:
            local.save(step, tree, as_saved)
        return True

    def _finish_pending(self, only_done: bool = False) -> None:
        """Records the saves in flight that committed, in save order (with ``only_done``, up to
        the first one still running); raises the first failure once all are handled."""
        first: CheckpointError | None = None
        while self._pending and not (only_done and not self._pending[0].handle.done()):
            pending = self._pending.popleft()
            try:
                pending.handle.wait()
            except Exception as e:
                error = CheckpointError(
                    f"The asynchronous save of step {pending.step} to {pending.path} failed: "
                    f"{str(e).rstrip('.')}. That step was not saved; earlier checkpoints are "
                    "intact. Fix: remove the cause (disk space, permissions) and save again."
                )
                error.__cause__ = e
                first = first or error
                continue
            # Not read back from the checkpoint: while the next save writes, even a small read
            # waits behind it.
            self._committed(_run.Entry(pending.step, pending.handle.time, pending.metrics))
        if first is not None:
            raise first from first.__cause__

    def _committed(self, entry: _run.Entry) -> None:
        """Records a committed save, then applies retention and rewrites the index."""
        self._entries[entry.step] = entry
        doomed = self._doomed()
        if doomed and self._unchecked and (self.best_metric or self.keep_every_n_hours):
            self._check_index()  # metrics and times decide: never delete on the index's word
            doomed = self._doomed()
        for step in doomed:
            if self._primary:
                self._delete(step)
            del self._entries[step]
        if self._primary:
            self._write_index()
        where = f"the retention after step {entry.step} in {self.directory}"
        _multihost.barrier(
            f"{self._barrier}-{next(self._commits)}", what="the manager", where=where
        )

    @logged_deletion
    def _delete(self, step: int) -> None:
        """Deletes a checkpoint; with ``async_save`` its files go in the background (while a
        save writes, a local directory's unlinks can take a second)."""
        rest = _storage.at(self.checkpoint_path(step)).retire()
        if rest is None:
            return
        self._in_background(f"deleting {rest.root}", rest.delete)

    def _ranked(self) -> list[int]:
        """Steps holding ``best_metric`` as a number, best first (NaN last; ties: the newer
        first). Other steps are never ranked (an older jaxckpt also stored array metrics)."""
        if self.best_metric is None:
            return []
        sign = 1.0 if self.best_mode == "min" else -1.0
        scored = []
        for e in self._entries.values():
            v = e.metrics.get(self.best_metric)
            if isinstance(v, (int, float)):
                v = float(v)
                scored.append((math.isnan(v), sign * v if not math.isnan(v) else 0.0, -e.step))
        return [-s for _, _, s in sorted(scored)]

    @logged_retention
    def _doomed(self) -> list[int]:
        steps = sorted(self._entries)  # the manager's own: a foreign step is never deleted
        if self.max_to_keep is None or not steps:
            return []
        keep = {steps[-1]}
        if self.best_metric is None:
            keep.update(steps[-self.max_to_keep :])
        else:
            ranked = self._ranked()
            keep.update(ranked[: self.max_to_keep])
            # Steps saved without the metric are kept by recency, as without best_metric.
            keep.update(set(steps[-self.max_to_keep :]) - set(ranked))
        if self.keep_every_n_steps:
            keep.update(s for s in steps if s % self.keep_every_n_steps == 0)
        if self.keep_every_n_hours:
            last = None
            for s in steps:
                t = self._entries[s].time
                if last is None or t - last >= self.keep_every_n_hours * 3600:
                    keep.add(s)
                    last = t
        return [s for s in steps if s not in keep]

    def wait_until_finished(self) -> None:
        """Waits for the saves in flight to commit and applies retention; raises an error."""
        try:
            if self._local is not None:
                self._local.wait()
            self._finish_pending()
        finally:
            self._reap(wait=True)

    def close(self) -> None:
        """Waits for the saves in flight (raising an error), then lets another process write
        the run (a later ``save`` takes the run back)."""
        try:
            self.wait_until_finished()
            if self._local is not None:
                self._local.close()
        finally:
            if self._writer is not None:
                self._writer()
                self._writer = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ restoring

    def restore(
        self, step: int | None = None, target: PyTree = None, **restore_kwargs: Any
    ) -> PyTree:
        """Restores ``step`` (None: the latest) like ``jc.restore(path, target, **kwargs)``.

        ``mngr.restore(5)`` and ``mngr.restore(5, state)`` restore step 5; an integer first
        argument is always a step. Any other first argument is the target, as ``jc.restore``
        takes it: ``mngr.restore(state)`` restores the latest step into ``state``.
        """
        if step is not None and not _is_step(step):
            if target is not None:
                raise TypeError(
                    f"restore's first argument is a step (an int) or, alone, the target; it "
                    f"was given a {type(step).__name__} and a target as well. Fix: "
                    "mngr.restore(target) for the latest step, or mngr.restore(step, target)."
                )
            step, target = None, step
        if step is not None:
            step = _checkpoint.check_step(step)
        self.wait_until_finished()
        if self._local is not None:
            persistent = max(self.steps, default=None)
            found, tree = self._local.restore(step, persistent, target, restore_kwargs)
            if found:
                return tree
        if step is None:
            step = max(self.steps, default=None)
            if step is None:
                raise CheckpointNotFoundError(
                    f"{self.directory} holds no committed checkpoint to restore. Fix: check the "
                    "directory, or start from scratch when mngr.latest_step is None."
                )
        self._entry(step)
        path = self.checkpoint_path(step)
        try:
            return _restore.restore(path, target, **restore_kwargs)
        except (CheckpointError, OSError) as e:
            if _storage.at(path).is_committed() or path == self._foreign.get(step):
                raise
            raise CheckpointNotFoundError(
                f"Step {step} ({path}) was deleted while it was being restored: another "
                "process's manager retired it (retention). Fix: mngr.reload() and restore a "
                "newer step, e.g. the latest."
            ) from e

    def reached_preemption(self, step: int) -> bool:
        """Whether every process reached the step at which to save before a preemption.

        Call it at every step on every process, e.g.
        ``mngr.save(step, state, force=mngr.reached_preemption(step))``. False on one process
        and where JAX's preemption service (``jax_enable_preemption_service``) is not running.
        """
        try:
            from jax.experimental.multihost_utils import reached_preemption_sync_point
        except ImportError:
            return False
        try:
            return bool(reached_preemption_sync_point(operator.index(step)))
        except RuntimeError:  # distributed, but without the preemption service
            return False

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, steps={self.steps})"


def _finish_at_exit(ref: weakref.ref[CheckpointManager]) -> None:
    """A script that ends without ``close()`` still commits its last asynchronous save."""
    mngr = ref()
    if mngr is not None and mngr._pending:
        try:
            mngr.wait_until_finished()
        except Exception as e:
            log.error("jaxckpt: %s", e)


def _is_step(x: Any) -> bool:
    """Whether ``restore``'s first argument names a step rather than being the target: an
    integer, or a value no target is (a float, a string) so that check_step says what is wrong."""
    if isinstance(x, (float, str, bytes, bool)):
        return True
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _check_count(name: str, value: int | None, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "a positive int or None" if none_ok else "a positive int"
        raise ValueError(f"{name} must be {allowed}, not {value!r}.")
