"""Progress of Python saves and restores, shown when asked: :func:`set_progress`.

Off by default. When on, a save (``save``, ``save_async``, a manager's ``save``) and a
restore draw one progress line on a stream (stderr by default) with ``_scan.Progress``, the
line ``jaxckpt verify`` draws: redrawn in place on a terminal, else a line every few seconds.
The bytes counted are those this process writes or reads; a bar is opened where a save
starts writing and a restore starts reading, and the I/O threads add to it as pieces land.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

_settings: dict[str, Any] = {"on": False, "stream": None, "every": None}


def set_progress(on: bool = True, *, stream: TextIO | None = None) -> None:
    """Shows (``on``) or hides the progress of saves and restores made from Python.

    Off by default, so nothing is printed unless asked. When on, each ``jc.save``,
    ``jc.save_async`` (drawn from the background as it writes), ``jc.restore`` and a
    ``CheckpointManager``'s ``save`` and ``restore`` draw a line such as
    ``save /run/ckpt-10: [###############               ]  50.0%  2.0 GiB of 4.0 GiB`` on
    ``stream`` (``sys.stderr`` when None): redrawn in place on a terminal, one line every 5
    seconds and one at the end elsewhere (a log file, a notebook). The command line's
    ``verify`` has its own, on unless ``-q``.

    Args:
        on: show the progress (True) or not (False).
        stream: where to draw it; None: ``sys.stderr`` as it is at each save or restore.

    Example:
        >>> jc.set_progress(True)  # doctest: +SKIP
    """
    if not isinstance(on, bool):
        raise TypeError(f"set_progress takes True or False, not {on!r}")
    if stream is not None and not callable(getattr(stream, "write", None)):
        raise TypeError(f"set_progress's stream must have a write() method, not {stream!r}")
    _settings.update(on=on, stream=stream)


@contextlib.contextmanager
def shown_on(stream: TextIO | None) -> Iterator[None]:
    """Within it, progress is drawn on ``stream`` (None: not drawn, as set before), whatever
    ``set_progress`` said; the setting is restored after (the command line's own bars)."""
    was = dict(_settings)
    if stream is not None:
        _settings.update(on=True, stream=stream)
    try:
        yield
    finally:
        _settings.update(was)


class Bar:
    """One operation's progress; ``add`` may be called from any thread."""

    on = True

    def __init__(self, label: str, total: int):
        from jaxckpt.tools.scan import (
            Progress,  # the CLI's progress line; imported late: no import cycle
        )

        self.label, self.done = label, 0
        self._lock = threading.Lock()
        stream = _settings["stream"] or sys.stderr
        self._progress = Progress(stream, every=_settings["every"])
        self._progress.total = total

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            self._progress.update(min(self.done, self._progress.total), self.label)

    def after(self, future: Any, nbytes: int) -> None:
        """Adds ``nbytes`` once ``future`` (a ``concurrent.futures.Future``) is done."""
        future.add_done_callback(lambda _: self.add(nbytes))

    def close(self) -> None:
        with self._lock:
            self._progress.close(self._progress.total, self.label)

    def abandon(self) -> None:
        """Ends a line redrawn in place, so that an error is printed on a line of its own."""
        with self._lock:
            if self._progress.tty:
                self._progress.stream.write("\n")
                self._progress.stream.flush()


class _Off:
    """The bar when progress is off: does nothing, costs nothing."""

    on = False

    def add(self, nbytes: int) -> None:
        pass

    def after(self, future: Any, nbytes: int) -> None:
        pass


_OFF = _Off()
_current: contextvars.ContextVar[Bar | _Off] = contextvars.ContextVar("jaxckpt_progress")


def current() -> Bar | _Off:
    """The bar of the save or restore this thread runs; pass it to the I/O threads."""
    return _current.get(_OFF)


@contextlib.contextmanager
def shown(label: str, total: Callable[[], int]) -> Iterator[Bar | _Off]:
    """The bar of an operation moving ``total()`` bytes (asked only when progress is on),
    drawn if progress is on; it is drawn complete when the block ends without an error."""
    if not _settings["on"]:
        yield _OFF
        return
    bar = Bar(label, total())
    token = _current.set(bar)
    try:
        yield bar
        bar.close()
    except BaseException:
        bar.abandon()
        raise
    finally:
        _current.reset(token)
