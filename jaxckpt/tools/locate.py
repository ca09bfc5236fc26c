"""Which checkpoints a command names: one checkpoint (``open_one``, with a hint when the path
is a manager's directory instead), or the committed checkpoints of a directory
(``committed``); and ``UsageError``, a bad argument or path."""

from __future__ import annotations

import os

from jaxckpt import storage as _storage
from jaxckpt.checkpoint.reader import Reader
from jaxckpt.checkpoint.reader import open as open_checkpoint
from jaxckpt.format import run as _run
from jaxckpt.interop import foreign


class UsageError(Exception):
    """A bad argument or path; the message says what to do instead."""


def committed(directory: str) -> list[tuple[int, str]]:
    """``(step or -1, name)`` of the committed checkpoints in ``directory``, by step (a
    checkpoint whose name is no step's, saved there by ``jc.save``, has -1)."""
    out = []
    store = _storage.at(directory)
    for name in store.names():
        if store.child(name).is_committed():
            step = _run.step_of(name)
            out.append((-1 if step is None else step, name))
    prefix = _storage.join(directory, "")
    out += [(step, path[len(prefix) :]) for step, path in foreign.run_steps(directory).items()]
    return sorted(out)


def open_one(path: str) -> Reader:
    """``jc.open``, with a hint when ``path`` is a manager's directory rather than one checkpoint."""
    try:
        return open_checkpoint(path)
    except FileNotFoundError:
        found = (
            committed(path)
            if os.path.isdir(path) and not os.path.exists(os.path.join(path, "zarr.json"))
            else []
        )
        if not found:
            raise
        newest = os.path.join(path, found[-1][1])
        raise UsageError(
            f"{os.path.abspath(path)} is a directory of {len(found)} checkpoints, not one checkpoint. "
            f"Fix: name one of them, e.g. {newest} (the newest); `jaxckpt ls {path}` lists them."
        ) from None
