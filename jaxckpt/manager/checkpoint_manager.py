"""``CheckpointManager``: many checkpoints of one run, ``directory/ckpt-<step>``; the package
:mod:`jaxckpt.manager` describes the run's directory and the modules this one uses.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import operator
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import save as _checkpoint
from jaxckpt.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from jaxckpt.format import run as _run
from jaxckpt.interop import foreign
from jaxckpt.local_tier import tier as _local_tier
from jaxckpt.log import logged_deletion, logged_retention
from jaxckpt.manager import arguments as _arguments
from jaxckpt.manager import in_flight as _in_flight
from jaxckpt.manager import retention as _retention
from jaxckpt.manager import steps as _steps

PyTree = Any
log = logging.getLogger("jaxckpt")
_serial = itertools.count()  # every process creates its managers in the same order


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
        rules = _retention.Rules(
            max_to_keep, keep_every_n_steps, keep_every_n_hours, best_metric, best_mode
        )
        _arguments.check(
            rules, save_interval_steps, local_save_interval_steps, local_max_to_keep, peer_replicas
        )
        self.directory = os.fspath(directory)
        self._store = _storage.at(self.directory)
        _arguments.check_directory(self.directory, self._store)
        self.max_to_keep, self.keep_every_n_steps, self.keep_every_n_hours = rules[:3]
        self.best_metric, self.best_mode = best_metric, best_mode
        self.save_interval_steps = save_interval_steps
        self.async_save = async_save
        self.read_only = read_only
        self.incremental = bool(incremental)
        self._last: str | None = None  # the path of this manager's previous save (a base)
        self._primary = _multihost.is_primary()
        self._pending: collections.deque[_in_flight.Pending] = collections.deque()  # save order
        self._worker = _in_flight.Worker(self.directory)
        self._writer: weakref.finalize | None = None  # releases the run's writer lock
        self._unwritable: OSError | None = None  # why a directory we cannot write is read-only
        self._barrier = f"jaxckpt-manager-{next(_serial)}"  # a barrier name is used once
        self._commits = itertools.count()
        self._open()
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

    def _open(self) -> None:
        """Clears what saves that never committed left (process 0), then reads the steps."""
        if self._primary and not self.read_only:
            self._store.make_dirs()  # a new run on a disk it cannot write: an error
            self._writing(_steps.remove_debris, self.directory, self._store)
        _multihost.barrier(f"{self._barrier}-start", what="the manager", where=self.directory)
        stale = self._load()
        if stale and self._primary and not self.read_only:
            self._writing(self._write_index, True)

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
        self._load()

    def _load(self) -> bool:
        """Reads the committed steps (:func:`jaxckpt.manager.steps.load`); whether the index
        is stale."""
        found = _steps.load(self.directory)
        self._entries, self._foreign = found.entries, found.foreign
        self._unchecked = found.unchecked
        return found.stale

    def _write_index(self, now: bool = False) -> None:
        """Rewrites the index: at once with ``now``, else on the manager's worker with ``async_save``."""
        index = _run.index_bytes([self._entries[s] for s in sorted(self._entries)])
        if now:
            self._store.write_atomic(_run.INDEX, index)
        else:
            what = f"rewriting its index {self.directory}/{_run.INDEX}"
            self._worker.run(self.async_save, what, self._store.write_atomic, _run.INDEX, index)

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
        ranked = _retention.ranked(self._entries, self._rules())
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
        self._worker.reap(wait=False)
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
            self._pending.append(_in_flight.Pending(step, path, handle, as_saved))
        else:
            _checkpoint.save(path, tree, step=step, metrics=as_saved, base=base, _hashing=hashing)
            self._committed(_steps.entry_from_metadata(path, step))
        if local is not None:
            local.save(step, tree, as_saved)
        return True

    def _finish_pending(self, only_done: bool = False) -> None:
        """Records the saves in flight that committed, in save order (with ``only_done``, up to
        the first one still running); raises the first failure once all are handled."""
        _in_flight.finish(self._pending, self._committed, only_done)

    def _committed(self, entry: _run.Entry) -> None:
        """Records a committed save, then applies retention and rewrites the index."""
        self._entries[entry.step] = entry
        doomed = self._doomed()
        if doomed and self._unchecked and (self.best_metric or self.keep_every_n_hours):
            # Metrics and times decide: never delete on the index's word.
            _steps.check_index(self.directory, self._entries, self._unchecked)
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
        self._worker.run(self.async_save, f"deleting {rest.root}", rest.delete)

    def _rules(self) -> _retention.Rules:
        return _retention.Rules(
            self.max_to_keep,
            self.keep_every_n_steps,
            self.keep_every_n_hours,
            self.best_metric,
            self.best_mode,
        )

    @logged_retention
    def _doomed(self) -> list[int]:
        return _retention.doomed(self._entries, self._rules())

    def wait_until_finished(self) -> None:
        """Waits for the saves in flight to commit and applies retention; raises an error."""
        try:
            if self._local is not None:
                self._local.wait()
            self._finish_pending()
        finally:
            self._worker.reap(wait=True)

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
        step, target = _arguments.step_and_target(step, target)
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
        is_foreign = path == self._foreign.get(step)
        return _steps.restore(path, step, is_foreign, target, restore_kwargs)

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
