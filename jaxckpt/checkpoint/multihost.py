"""Process index, barriers and agreement between the processes of one job.

Every function here is an exact no-op on one process. In a job of several JAX processes
(``jax.distributed.initialize``) every process calls ``jc.save`` with the same path, in the same
order; a :class:`SaveSync` coordinates one save over JAX's distributed runtime:

- ``share``: process 0 computes a value (the temporary directory) and the others read it from
  the runtime's key-value store;
- ``barrier(phase)``: waits for every process, then raises if any of them reported a failure;
- ``abandon``: a process that fails posts its error and still attends the next barrier, so its
  peers stop at once with that error instead of waiting for the timeout.

A barrier that is not reached in time (``JAXCKPT_BARRIER_TIMEOUT_S`` seconds, default 600)
raises :class:`~jaxckpt.CoordinationError` naming the processes that did not arrive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from jaxckpt.errors import CoordinationError
from jaxckpt.format.metadata import Record

TIMEOUT_ENV = "JAXCKPT_BARRIER_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
log = logging.getLogger("jaxckpt")


_alone = threading.local()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """In this thread, saves act as if this process were the job's only one: each process
    writes its own part of a local-tier step by itself (see jaxckpt/local_tier/tier.py)."""
    before = getattr(_alone, "on", False)
    _alone.on = True
    try:
        yield
    finally:
        _alone.on = before


def process_index() -> int:
    return 0 if getattr(_alone, "on", False) else jax.process_index()


def process_count() -> int:
    return 1 if getattr(_alone, "on", False) else jax.process_count()


def is_primary() -> bool:
    return process_index() == 0


def timeout_s() -> float:
    """The barrier timeout in seconds: ``$JAXCKPT_BARRIER_TIMEOUT_S``, else 600."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(
            f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds. Fix: set it to e.g. "
            f"{TIMEOUT_ENV}=1800, or unset it for the default of {DEFAULT_TIMEOUT_S:g} s."
        )
    return value


def _client() -> Any:
    """JAX's distributed runtime client (set by ``jax.distributed.initialize``)."""
    from jax._src import distributed

    return distributed.global_state.client


NOTHING_COMMITTED = "Nothing was committed; earlier checkpoints are intact."


def barrier(
    name: str,
    *,
    what: str = "the job",
    where: str = "",
    timeout: float | None = None,
    outcome: str = "",
) -> None:
    """Waits until every process reaches the barrier ``name``; a no-op on one process.

    Raises:
        CoordinationError: a process did not arrive within the timeout, or one died.
    """
    if process_count() == 1:
        return
    seconds = timeout_s() if timeout is None else timeout
    try:
        _client().wait_at_barrier(name, max(1, int(seconds * 1000)))
    except CoordinationError:
        raise
    except Exception as e:  # jax.errors.JaxRuntimeError from the coordination service
        raise _runtime_error(f"{what} stopped at {where or repr(name)}", seconds, e, outcome) from e


def _runtime_error(
    where: str, seconds: float, e: Exception, outcome: str = "", late: list[str] | None = None
) -> CoordinationError:
    """Turns the distributed runtime's error into one that says what happened and the fix."""
    text = str(e)
    if "heartbeat" in text:
        dead = re.findall(r"Task (\d+) heartbeat timeout", text)
        who = f"process {', '.join(dead)}" if dead else "a process"
        reason = (
            f"{who} stopped sending heartbeats to JAX's distributed runtime: it died, was "
            "killed or was preempted"
        )
        fix = "restart the job; it restores the latest committed checkpoint"
    elif "DEADLINE_EXCEEDED" in text or "timed out" in text.lower():
        late = late if late is not None else _late_processes(text)
        who = f"process {', '.join(late)}" if late else "some process"
        reason = (
            f"{who} did not arrive within {seconds:g} s: it did not call this save, crashed, "
            "hung, failed before reaching this point, or is much slower (a large checkpoint on "
            "slow storage)"
        )
        if str(jax.process_index()) in late:
            reason = (
                f"this process arrived after the others had given up waiting ({seconds:g} s): "
                "it is much slower than they are, or was paused"
            )
        fix = (
            f"look for an earlier error in the log of {who}; if it is merely slow, raise "
            f"the timeout, e.g. {TIMEOUT_ENV}={max(1800, int(seconds * 4))}"
        )
    elif "UNAVAILABLE" in text:
        reason = (
            "JAX's coordination service (run by process 0) is unreachable: process 0 "
            "died, or the network failed"
        )
        fix = "restart the job; it restores the latest committed checkpoint"
    else:
        reason = "JAX's distributed runtime reported an error"
        fix = "see the runtime's message below and the logs of the other processes"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return CoordinationError(
        f"jaxckpt: {where} on process {jax.process_index()} of {jax.process_count()}: {reason}. "
        f"{outcome + ' ' if outcome else ''}Fix: {fix}.\n"
        f"  JAX distributed runtime: {first}"
    )


def _late_processes(text: str) -> list[str]:
    m = re.search(r"timed out task names:\s*\n((?:\s*\S+\s*\n?)+)", text)
    if not m:
        return []
    names = []
    for line in m.group(1).splitlines():
        line = line.strip()
        if not line or not re.fullmatch(r"[\w/:.-]+", line):
            break
        names.append(line.rsplit(":", 1)[-1].rsplit("/", 1)[-1])
    return [n for n in names if n.isdigit()]


def own_state(rec: Record) -> Record:
    """A state leaf's record as this process saved it, when each process saved its own.

    A save by several processes whose states differ (each host's data iterator) keeps them all
    in ``"per_process"``; a restore by as many processes gives each its own, and any other
    restore process 0's (``"v"``).
    """
    per = rec.get("per_process")
    if not per:
        return rec
    if len(per) != process_count():
        log.warning(
            "jaxckpt: the state at %s was saved by %d processes, each its own; restoring in %d "
            "processes, every process gets process 0's.",
            rec.get("cls", "a leaf"),
            len(per),
            jax.process_count(),
        )
        return rec
    return {**rec, "v": per[jax.process_index()]}


PHASES = {
    "start": "every process has begun the save",
    "written": "every process has written its shards",
    "committed": "process 0 has committed the checkpoint",
}


class SaveSync:
    """Coordinates the processes of one save; every method is a no-op on one process.

    Saves are numbered in the order each process starts them, so every process must start
    the same saves in the same order (``share`` checks the path against process 0's).
    """

    _started = 0

    def __init__(self, what: str, phases: Sequence[str]):
        SaveSync._started += 1
        self.key = f"jaxckpt/save/{SaveSync._started}"
        self.what = what
        self.phases = list(phases)
        self._next = 0
        self.multi = process_count() > 1

    def share(self, name: str, make: Callable[[], str]) -> str:
        """Process 0's ``make()``, read by every other process from the key-value store."""
        if not self.multi:
            return make()
        key = f"{self.key}/{name}"
        if is_primary():
            value = make()
            _client().key_value_set(key, value)
            return value
        seconds = timeout_s()
        try:
            return str(_client().blocking_key_value_get(key, max(1, int(seconds * 1000))))
        except Exception as e:
            where = f"{self.what} waited for process 0 to start the same save"
            raise _runtime_error(where, seconds, e, NOTHING_COMMITTED, late=["0"]) from e

    def post(self, name: str, value: str) -> None:
        """Publishes this process's ``value``, for process 0 to ``collect`` after a barrier."""
        if self.multi and not is_primary():
            _client().key_value_set(f"{self.key}/{name}/{jax.process_index()}", value)

    def collect(self, name: str, own: str) -> list[str]:
        """On process 0, after the barrier that follows every ``post``: all values, by index."""
        if not self.multi:
            return [own]
        got = {
            k.rsplit("/", 1)[-1]: v for k, v in _client().key_value_dir_get(f"{self.key}/{name}/")
        }
        return [own] + [got[str(i)] for i in range(1, jax.process_count())]

    def barrier(self, phase: str) -> None:
        """Waits for every process at ``phase``, then raises any failure a process reported."""
        if phase != self.phases[self._next]:
            raise RuntimeError(f"jaxckpt: barrier {phase!r} out of order in {self.phases}")
        self._next += 1
        if not self.multi:
            return
        where = f"its barrier {phase!r} ({PHASES.get(phase, phase)})"
        barrier(f"{self.key}/{phase}", what=self.what, where=where, outcome=self._outcome(phase))
        # Only failures posted for this barrier: a peer that fails after passing it posts for
        # the next one, which it attends, and must not stop us before we get there too.
        failures = _client().key_value_dir_get(f"{self.key}/error/{phase}/")
        if failures:
            lines = "\n".join(f"  process {k.rsplit('/', 1)[-1]}: {v}" for k, v in sorted(failures))
            raise CoordinationError(
                f"jaxckpt: {self.what} failed on another process, so every process stops at the "
                f"barrier {phase!r}. {self._outcome(phase)} Fix: see that process's log for the "
                f"cause.\n{lines}"
            )

    def _outcome(self, phase: str) -> str:
        if phase != self.phases[-1]:
            return NOTHING_COMMITTED
        if is_primary():
            return "Process 0 had committed the checkpoint before this barrier."
        return "Process 0 may have committed the checkpoint: check it with jc.restore."

    def abandon(self, error: BaseException) -> None:
        """Reports this process's ``error`` to its peers and attends their next barrier."""
        if not self.multi or isinstance(error, CoordinationError) or self._next >= len(self.phases):
            return
        phase = self.phases[self._next]
        self._next = len(self.phases)
        try:
            client = _client()
            message = f"{type(error).__name__}: {error}"[:4000]
            client.key_value_set(f"{self.key}/error/{phase}/{jax.process_index()}", message)
            barrier(f"{self.key}/{phase}", what=self.what)
        except Exception as e:  # the original error is the one worth raising
            log.warning(
                "jaxckpt: could not tell the other processes that %s failed: %s", self.what, e
            )
