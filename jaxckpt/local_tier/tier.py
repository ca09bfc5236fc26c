"""A manager's local tier: frequent checkpoints on each host's own disk, each process's part
replicated to peers on other hosts, and a restart that restores from whatever survived.

Every ``local_save_interval_steps`` each process writes its part of the step to its
``local_directory`` (see :mod:`jaxckpt.local_tier.parts`), sends a copy to the processes that hold
its replicas (on other hosts), and writes the replicas it holds for others. A step counts once
every process has committed its part and the replicas it holds. After a restart (as many
processes, some hosts new), the processes tell each other which parts they hold and agree on
the newest step every part of which survived somewhere; each process missing its own part
gets it from a survivor, then restores from it. See docs/multihost.md.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import socket
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.checkpoint import save as _checkpoint
from jaxckpt.errors import CheckpointError
from jaxckpt.format import run as _run
from jaxckpt.local_tier import channel as _local_channel
from jaxckpt.local_tier import parts as _local_parts
from jaxckpt.local_tier.parts import part_dir, step_dir

PyTree = Any
log = logging.getLogger("jaxckpt")
HOST_ENV = "JAXCKPT_HOST_ID"
MARKER = ".jaxckpt-local-process-"


def host_id() -> str:
    """This process's host: ``$JAXCKPT_HOST_ID``, else the machine's name. Replicas never sit
    on their original's host; give each process its own id to test on one machine."""
    return os.environ.get(HOST_ENV, "").strip() or socket.gethostname()


def check(interval: Any, max_to_keep: Any, replicas: Any) -> None:
    """Refuses arguments of the local tier that mean nothing (a manager checks them always)."""
    for name, value, least in (
        ("local_save_interval_steps", interval, 1),
        ("local_max_to_keep", max_to_keep, 1),
        ("peer_replicas", replicas, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            kind = "a positive int" if least else "a non-negative int"
            raise ValueError(f"{name} must be {kind}, not {value!r}.")


def placement(hosts: list[str], replicas: int) -> dict[int, list[int]]:
    """Which processes hold a replica of each process's part: for a process on the ``i``-th
    host (in order of first process), one process on each of the next ``replicas`` hosts."""
    order: dict[str, list[int]] = {}
    for p, h in enumerate(hosts):
        order.setdefault(h, []).append(p)
    groups = list(order.values())
    k = len(groups)
    out = {}
    for i, members in enumerate(groups):
        for pos, p in enumerate(members):
            out[p] = [
                groups[(i + j) % k][pos % len(groups[(i + j) % k])]
                for j in range(1, min(replicas, k - 1) + 1)
            ]
    return out


def _usable(
    invs: list[dict[str, Any]], n: int, needs: list[str] | None
) -> dict[int, dict[int, list[int]]]:
    """The steps every part of which some process holds (with ``needs``: parts whose layout
    is the one each owner's target needs), each as owner -> the processes holding it."""
    steps: dict[int, dict[int, list[int]]] = {}
    for q, inv in enumerate(invs):
        for key, (processes, layout) in inv["held"].items():
            step, owner = map(int, key.split("/"))
            if processes != n or owner >= n or (needs is not None and needs[owner] != layout):
                continue
            steps.setdefault(step, {}).setdefault(owner, []).append(q)
    return {s: owners for s, owners in steps.items() if len(owners) == n}


class LocalTier:
    """The local tier of one manager; every process creates it and calls it at the same points."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        interval: int,
        max_to_keep: int,
        replicas: int,
        async_save: bool,
        name: str,
    ):
        self.directory = os.fspath(directory)
        if _storage.at(self.directory).os_path() is None:  # an object store
            raise ValueError(
                f"local_directory must be a path on this host's own disk, not {self.directory!r}."
                " Fix: give a local path (NVMe, /dev/shm); the persistent tier takes URLs."
            )
        self.interval, self.max_to_keep, self.replicas = interval, max_to_keep, replicas
        self.p, self.n = _multihost.process_index(), _multihost.process_count()
        self._key = f"jaxckpt/local/{name}"
        self._rounds = itertools.count()
        self._hashes: dict[tuple[str, int, int], tuple[int, str]] = {}
        os.makedirs(self.directory, exist_ok=True)
        # One process sends nothing: no port to open.
        self._channel = _local_channel.transport(self.directory, self.n > 1)
        peers = self._exchange("hosts", {"host": host_id(), "address": self._channel.address()})
        hosts = [peer["host"] for peer in peers]
        self._channel.connect([peer["address"] for peer in peers])
        self.holders = placement(hosts, replicas)
        self.held_for = sorted(o for o, hs in self.holders.items() if self.p in hs)
        if replicas and self.n > 1 and not self.holders[self.p]:
            log.warning(
                "jaxckpt: every process of this job is on one host (%s), so the local tier "
                "keeps no replica on another host: it cannot survive losing that host. Set "
                "%s per process to test on one machine.",
                hosts[0],
                HOST_ENV,
            )
        about = {"process": self.p, "processes": self.n, "host": hosts[self.p]}
        _storage.at(self.directory).write_atomic(f"{MARKER}{self.p}", json.dumps(about).encode())
        self._remove_debris()
        usable = _usable(self._exchange("held", {"held": self._inventory()}), self.n, None)
        self.steps = sorted(usable)  # the steps that can be assembled, oldest first
        for step in self._on_disk():
            if step not in usable:
                log.info("jaxckpt: removed local step %s: some part survived nowhere", step)
                _local_parts.remove(step_dir(self.directory, step))
        self._newest = max(self.steps, default=-1)
        self._job: Future[None] | None = None
        self._job_step = -1
        self._pool = ThreadPoolExecutor(1, "jaxckpt-local") if async_save else None
        # Kept open after close(): a later save of the manager uses them again.
        weakref.finalize(self, _release, self._pool, self._channel)
        self._retain()

    # ------------------------------------------------------------------------ state

    @property
    def latest(self) -> int | None:
        return max(self.steps, default=None)

    def _on_disk(self) -> list[int]:
        """The local steps in this directory (complete or not)."""
        steps = [_run.step_of(n) for n in os.listdir(self.directory)]
        found = (s for s in steps if s is not None)
        return sorted(s for s in found if os.path.isdir(step_dir(self.directory, s)))

    def _inventory(self) -> dict[str, list[Any]]:
        """The committed parts in this directory: ``"step/owner"`` -> [processes, layout]."""
        held = {}
        for step in self._on_disk():
            try:
                names = os.listdir(step_dir(self.directory, step))
            except FileNotFoundError:  # removed meanwhile (a process sharing the directory)
                continue
            for name in names:
                owner = _local_parts.owner_of(name)
                path = part_dir(self.directory, step, owner) if owner is not None else ""
                if owner is None or not _local_parts.is_committed(path):
                    continue
                try:
                    ino = os.stat(os.path.join(path, _storage.COMMIT)).st_ino
                except FileNotFoundError:
                    continue
                if (path, ino, step) not in self._hashes:
                    try:
                        self._hashes[(path, ino, step)] = _local_parts.read_hash(path)
                    except (CheckpointError, OSError, KeyError, ValueError) as e:
                        log.warning("jaxckpt: ignored the local part %s: %s", path, e)
                        continue
                held[f"{step}/{owner}"] = list(self._hashes[(path, ino, step)])
        return held

    def _remove_debris(self) -> None:
        """What local saves cut short left: temporary names, and parts without ``COMMIT``."""
        for step in self._on_disk():
            where = step_dir(self.directory, step)
            for name in os.listdir(where):
                path = os.path.join(where, name)
                if _storage.TMP_MARK in name or not _local_parts.is_committed(path):
                    _storage.at(path).remove_if_abandoned()
        for name in os.listdir(self.directory):
            if _storage.TMP_MARK in name:
                _storage.at(os.path.join(self.directory, name)).remove_if_abandoned()

    def _exchange(self, what: str, mine: Any) -> list[Any]:
        """Every process's ``mine``, by process index, once all have posted theirs."""
        if self.n == 1:
            return [mine]
        key = f"{self._key}/{what}/{next(self._rounds)}"
        client = _multihost._client()
        client.key_value_set(f"{key}/{self.p}", json.dumps(mine))
        _multihost.barrier(key, what="the local tier", where=f"{what} ({self.directory})")
        got = {k.rsplit("/", 1)[-1]: v for k, v in client.key_value_dir_get(f"{key}/")}
        return [json.loads(got[str(i)]) for i in range(self.n)]

    # ------------------------------------------------------------------------ saving

    def due(self, step: int, force: bool) -> bool:
        return step > self._newest and (force or step % self.interval == 0)

    def save(self, step: int, tree: PyTree, metrics: dict[str, Any]) -> None:
        """Snapshots this process's part of ``tree``; it is written and replicated in the
        background (with ``async_save``), one step at a time."""
        self.wait()
        part, buffers = _local_parts.split(tree)
        self._newest = self._job_step = step
        job = functools.partial(self._write, step, part, buffers, metrics)
        if self._pool is not None:
            self._job = self._pool.submit(job)
        else:
            self._job = Future()
            try:
                job()
                self._job.set_result(None)
            except BaseException as e:  # raised by wait, after the barrier every process attends
                self._job.set_exception(e)
            self.wait()

    def _write(
        self, step: int, part: dict[str, Any], buffers: list[Any], metrics: dict[str, Any]
    ) -> None:
        own = part_dir(self.directory, step, self.p)
        key = f"{self._key}/save/{step}"
        try:
            os.makedirs(step_dir(self.directory, step), exist_ok=True)
            with _multihost.alone():
                _checkpoint.save(own, part, step=step, metrics=metrics)
        except BaseException as e:
            for q in self.holders[self.p]:
                self._channel.fail(f"{key}/{self.p}/{q}", e, q)
            raise
        finally:
            part.clear()  # nothing refers to the snapshot's buffers now
            _runtime.give_buffers(buffers)
        for q in self.holders[self.p]:
            what = f"the replica of process {self.p}'s part of local step {step}"
            self._channel.send(f"{key}/{self.p}/{q}", own, q, what)
        for o in self.held_for:
            what = f"the replica of process {o}'s part of local step {step}"
            staged = self._channel.receive(f"{key}/{o}/{self.p}", o, what)
            _local_parts.place(staged, part_dir(self.directory, step, o))
        if self.n > 1:
            _multihost._client().key_value_set(f"{self._key}/done/{step}/{self.p}", "1")

    def wait(self) -> None:
        """Waits for the local save in flight; once every process has, counts its step if
        every part and replica committed, and applies retention. Raises its error."""
        if self._job is None:
            return
        job, step, self._job = self._job, self._job_step, None
        error = job.exception()
        where = f"the local save of step {step} in {self.directory}"
        _multihost.barrier(f"{self._key}/saved/{step}", what="the local tier", where=where)
        if self.n == 1:
            complete = error is None
        else:
            done = _multihost._client().key_value_dir_get(f"{self._key}/done/{step}/")
            complete = len(done) == self.n
        if complete:
            self.steps.append(step)
        self._retain()
        if error is not None:
            raise CheckpointError(
                f"The local save of step {step} to {part_dir(self.directory, step, self.p)} "
                f"failed: {str(error).rstrip('.')}. That step is not in the local tier; earlier "
                "steps and the persistent tier are intact. Fix: remove the cause (disk space on "
                "the local directory, a peer that failed: see its log)."
            ) from error

    def _retain(self) -> None:
        """Keeps the newest ``max_to_keep`` complete steps, and any newer one still being
        written; removes the rest from this directory (in the background)."""
        self.steps = self.steps[-self.max_to_keep :]
        newest = max(self.steps, default=-1)
        doomed = [s for s in self._on_disk() if s not in self.steps and s < newest]
        for step in doomed:
            path = step_dir(self.directory, step)
            if self._pool is not None:
                self._pool.submit(_local_parts.remove, path)
            else:
                _local_parts.remove(path)

    def close(self) -> None:
        """Waits for the local save in flight and for the removals retention started."""
        self.wait()
        if self._pool is not None:
            self._pool.submit(lambda: None).result()  # its one worker runs jobs in order

    # ------------------------------------------------------------------------ restoring

    def restore(
        self, step: int | None, persistent: int | None, target: PyTree, kwargs: dict[str, Any]
    ) -> tuple[bool, PyTree]:
        """Restores ``step`` (None: the newest, unless ``persistent`` is newer) from the local
        tier when every process's part survived somewhere in the layout each process's
        ``target`` needs: ``(True, tree)``; else ``(False, None)``. Every process calls it."""
        if self._pool is not None:  # retention's removals done: what is listed stays
            self._pool.submit(lambda: None).result()
        need = None
        if target is not None and not kwargs:
            need = _local_parts.layout_hash(self.n, _local_parts.layout_of(target))
        invs = self._exchange("restore", {"held": self._inventory(), "need": need})
        needs = [inv["need"] for inv in invs]
        usable = _usable(invs, self.n, needs) if None not in needs else {}
        if step is None:
            newer = [s for s in usable if persistent is None or s >= persistent]
            chosen = max(newer, default=None)
            stale = [s for s in self.steps if persistent is None or s > persistent]
            if chosen is None and stale and None not in needs:
                # This job resumes from an older step and cannot restore these: saving again
                # from there must not meet them.
                log.info(
                    "jaxckpt: local steps %s do not match the restore's target (another mesh or "
                    "sharding) or did not survive; restoring from the persistent tier, and "
                    "removing them from %s",
                    stale,
                    self.directory,
                )
                for s in stale:
                    _local_parts.remove(step_dir(self.directory, s))
                self.steps = [s for s in self.steps if s not in stale]
                self._newest = max([*self.steps, -1 if persistent is None else persistent])
        else:
            chosen = step if step in usable else None
        if chosen is None:
            return False, None
        owners = usable[chosen]
        key = f"{self._key}/fetch/{next(self._rounds)}"
        for o, holders in owners.items():
            if o not in holders and holders[0] == self.p:
                what = f"process {o}'s part of local step {chosen}"
                # Sent before this process reads its own: the CPU and the disk go to the
                # process waiting for it first (it is the job's slowest). Not synced there:
                # read back at once, and a copy survives here anyway.
                path = part_dir(self.directory, chosen, o)
                self._channel.send(f"{key}/{o}", path, o, what, durable=False)
        own = part_dir(self.directory, chosen, self.p)
        if self.p not in owners[self.p]:
            sender = owners[self.p][0]
            what = f"process {self.p}'s part of local step {chosen}"
            staged = self._channel.receive(f"{key}/{self.p}", sender, what)
            _local_parts.place(staged, own, durable=False)
            log.info("jaxckpt: got local step %d's part from process %d", chosen, sender)
        return True, _local_parts.assemble(own, target)


def _release(pool: ThreadPoolExecutor | None, channel: Any) -> None:
    if pool is not None:
        pool.shutdown(wait=False)
    channel.close()


def describe(
    directory: str,
) -> tuple[list[int], list[tuple[int, list[int], list[int], int]]] | None:
    """For ``jaxckpt ls``: None unless ``directory`` is a local tier; else the processes that
    use it and, per step, the parts it holds for them, those it holds for peers, and bytes."""
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    mine = sorted(
        int(n[len(MARKER) :]) for n in names if n.startswith(MARKER) and n[len(MARKER) :].isdigit()
    )
    if not mine:
        return None
    rows = []
    for name in names:
        step = _run.step_of(name)
        if step is None or not os.path.isdir(os.path.join(directory, name)):
            continue
        owners = []
        size = 0
        for part in os.listdir(os.path.join(directory, name)):
            owner = _local_parts.owner_of(part)
            path = os.path.join(directory, name, part)
            if owner is None or not _local_parts.is_committed(path):
                continue
            owners.append(owner)
            for f in _local_parts.files_of(path):
                size += os.path.getsize(os.path.join(path, f))
        own = sorted(o for o in owners if o in mine)
        rows.append((step, own, sorted(set(owners) - set(own)), size))
    return mine, sorted(rows)
