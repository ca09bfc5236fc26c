"""Saving one checkpoint: ``save`` is the synchronous case of ``save_async``'s path.

Both run the steps of :mod:`jaxckpt.checkpoint.save_steps` (plan the tree, write every
array's pieces and the metadata, then commit); ``save_async`` runs the writing and the commit
in a worker after a host snapshot, and its ``SaveHandle`` reports how that ended. This module
also checks a save's ``step`` and ``metrics``.
"""

from __future__ import annotations

import operator
import os
import sys
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

import jax
import numpy as np

from jaxckpt import runtime as _runtime
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.checkpoint import save_steps as _steps
from jaxckpt.checkpoint import snapshot as _snapshot
from jaxckpt.checkpoint import write as _write
from jaxckpt.errors import CheckpointError
from jaxckpt.format import metadata as _metadata
from jaxckpt.log import logged_save, logged_save_async

PyTree = Any


class SaveHandle:
    """A save in flight: ``wait()`` returns the final path or raises the save's error."""

    def __init__(self, save: _steps.Save, held: int, on_device: list[_plan.Piece]):
        self.path = save.final
        self.time = 0.0  # when it was written, as its metadata says; set once it is committed
        self._error: BaseException | None = None
        self._seen = False
        # A worker of a pool, not a thread of its own: starting a thread waits until it runs,
        # which the caller would wait for while an earlier save's threads are busy.
        with _runtime.order:
            self._after, _runtime.last = _runtime.last, self
            self._future = _runtime.pool("save").submit(self._run, save, held, on_device)

    def _run(self, save: _steps.Save, held: int, on_device: list[_plan.Piece]) -> None:
        try:
            _snapshot.fetch(on_device, save.buffers)  # under way before any earlier save ends
            on_device.clear()
            if self._after is not None:  # writes go one save at a time, in call order
                futures.wait([self._after._future])
                self._after = None
            _steps.execute(save, budget=1 << 62)
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
@_metadata.gc_paused()  # the caller waits: no collection (JAX's gc callback) per 10,000 records
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
    s = _steps.prepare(path, tree, extra_attributes(step, metrics), base, _hashing)
    return _steps.execute(s, budget=_write.STREAM_BYTES)


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
        s = _steps.prepare(path, tree, extra_attributes(step, metrics), base, _hashing)
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
