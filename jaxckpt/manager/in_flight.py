"""What a manager has in flight: its asynchronous saves not yet known committed, and its own
work (deleted checkpoints' files, index rewrites) on one worker."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from jaxckpt import runtime as _runtime
from jaxckpt.checkpoint import save as _checkpoint
from jaxckpt.errors import CheckpointError
from jaxckpt.format import run as _run


@dataclasses.dataclass
class Pending:
    """An asynchronous save of the manager's, in flight."""

    step: int
    path: str
    handle: _checkpoint.SaveHandle
    metrics: dict[str, Any]  # as its metadata holds them


def finish(
    pending: collections.deque[Pending],
    committed: Callable[[_run.Entry], None],
    only_done: bool = False,
) -> None:
    """Hands ``committed`` each save of ``pending`` that committed, in save order (with
    ``only_done``, up to the first one still running); raises the first failure once all are
    handled."""
    first: CheckpointError | None = None
    while pending and not (only_done and not pending[0].handle.done()):
        p = pending.popleft()
        try:
            p.handle.wait()
        except Exception as e:
            error = CheckpointError(
                f"The asynchronous save of step {p.step} to {p.path} failed: "
                f"{str(e).rstrip('.')}. That step was not saved; earlier checkpoints are "
                "intact. Fix: remove the cause (disk space, permissions) and save again."
            )
            error.__cause__ = e
            first = first or error
            continue
        # Not read back from the checkpoint: while the next save writes, even a small read
        # waits behind it.
        committed(_run.Entry(p.step, p.handle.time, p.metrics))
    if first is not None:
        raise first from first.__cause__


class Worker:
    """The manager's own writes (deleted checkpoints' files, index rewrites) on one worker,
    in order: on a disk busy with a save, an index rewrite inside a save call held it up."""

    def __init__(self, directory: str):
        self.directory = directory
        self._work: collections.deque[tuple[str, Future[None]]] = collections.deque()

    def run(self, background: bool, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Runs ``fn(*args)`` after what the worker already has, with ``background``; else
        now."""
        if background:
            self._work.append((what, _runtime.pool("manager").submit(fn, *args)))
        else:
            fn(*args)

    def reap(self, wait: bool) -> None:
        """Forgets the work that finished (with ``wait``, all of it, once done); raises its
        first error."""
        while self._work and (wait or self._work[0][1].done()):
            what, done = self._work.popleft()
            try:
                done.result()
            except Exception as e:
                raise CheckpointError(
                    f"The manager of {self.directory} failed {what}: {str(e).rstrip('.')}. Its "
                    "committed checkpoints are intact, and a stale index is rebuilt from them. "
                    "Fix: remove the cause (disk space, permissions); the next save rewrites the "
                    "index."
                ) from e
