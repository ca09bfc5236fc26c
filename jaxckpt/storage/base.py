"""The one storage interface: :class:`Store`, and the commit protocol every save follows.

A :class:`Store` is one location (a checkpoint, or a directory of checkpoints) on one kind of
storage; :func:`jaxckpt.storage.at` picks the implementation from the location's spelling.
Keys are ``/``-separated paths relative to the location. The code above this package never
asks which kind of store it holds: what differs is a method here (or a capability such as
:meth:`Store.os_path`, which only a store of real files answers).

Commit protocol. A save calls, in this order (``jaxckpt.checkpoint.save_steps.execute``)::

    final = at(path)
    final.is_committed(), final.occupied()  # refuse to overwrite anything
    tmp = final.temporary()          # a sibling directory locally; the final prefix elsewhere
    lock = tmp.begin()               # makes and locks it, or marks the prefix PENDING
    tmp.os_path(...) / tmp.open_array(...) / tmp.write_many(...) / tmp.link(src, name)
    tmp.make_durable()               # syncfs; an acknowledged PUT is durable already
    tmp.missing(written)             # nothing deleted under the save's feet
    tmp.write_durable(COMMIT, ...)   # the checkpoint's last file
    tmp.commit(final)                # rename into place; on an object store, drop PENDING
    lock.release()                   # on failure instead: tmp.delete(), then lock.release()

A reader ignores a location without ``COMMIT``. Deleting a checkpoint first makes it stop being
one (``rest = at(path).retire()``: renamed to a debris name, or its ``COMMIT`` deleted), then
removes what is left (``rest.delete()``), so that no crash leaves it half-deleted but listed.
Debris of a save whose writer died is removed by :meth:`Store.remove_if_abandoned`.
"""

from __future__ import annotations

import abc
import errno
import json
import os
from collections.abc import Callable
from typing import Any

import tensorstore as ts

from jaxckpt import runtime as _runtime
from jaxckpt.errors import CorruptCheckpointError
from jaxckpt.storage import leases
from jaxckpt.storage.confine import Unconfined
from jaxckpt.storage.leases import Lock

COMMIT = "COMMIT"
PENDING = "PENDING"
TMP_MARK = ".jaxckpt-tmp-"


def join(root: str | os.PathLike[str], name: str) -> str:
    """``root/name``, keeping ``root`` as the caller spelled it (relative paths stay relative)."""
    return os.fspath(root).rstrip("/") + "/" + name


def is_debris(name: str) -> bool:
    """Whether ``name`` is left over by a local jaxckpt write that never committed."""
    return TMP_MARK in name


def parse_json(where: str, data: bytes | None) -> Any:
    """The JSON value of a file's bytes; None (the file is missing) raises
    ``FileNotFoundError`` naming ``where``, bytes that are not JSON ``CorruptCheckpointError``."""
    if data is None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", where)
    try:
        return json.loads(data)
    except ValueError as e:  # UnicodeDecodeError too: a damaged byte >= 0x80
        raise CorruptCheckpointError(
            f"{where} is not valid JSON ({e}); the checkpoint's metadata is damaged. Fix: restore "
            "an earlier checkpoint."
        ) from e


class Store(abc.ABC):
    """One location on one kind of storage; every method's keys are relative to it."""

    def __init__(self, root: str):
        self.root = root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def child(self, name: str) -> Store:
        """The store of ``root/name`` (a checkpoint of a run directory, say)."""
        return type(self)(join(self.root, name))

    # ------------------------------------------------------------------------ where bytes are

    @abc.abstractmethod
    def os_path(self, key: str = "") -> str | None:
        """The file system path of ``key``, where the store is a directory of real files: the
        local fast path reads and writes chunk files there with plain ``os`` calls. None where
        the store has no files (TensorStore kvstores): go through :meth:`open_array` then."""

    @abc.abstractmethod
    def kvstore_spec(self, rel: str = "") -> dict[str, Any]:
        """The TensorStore kvstore spec of the prefix ``root/rel/`` (its path ends in ``/``)."""

    def open_kv(self) -> ts.KvStore:
        """The TensorStore kvstore of the location (a direct handle: its errors are raw)."""
        return ts.KvStore.open(self.kvstore_spec(), context=_runtime.context()).result()

    # ------------------------------------------------------------------------ reading

    @abc.abstractmethod
    def read(self, key: str) -> bytes | None:
        """The bytes of ``key``, or None when it does not exist."""

    @abc.abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes of ``key`` from ``offset`` (fewer at its end), None when missing."""

    @abc.abstractmethod
    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """The bytes of each key (None: missing), read together (threads, or requests in
        flight at once)."""

    def read_json(self, key: str) -> Any:
        return self.read_jsons([key])[0]

    def read_jsons(
        self, keys: list[str], check: Callable[[str, bytes | None], None] | None = None
    ) -> list[Any]:
        """The JSON files ``keys``, read together. ``check(key, data)`` sees each file's bytes
        before they are parsed; a missing file raises ``FileNotFoundError``."""
        datas = self.read_many(keys)
        if check is not None:
            for k, d in zip(keys, datas, strict=True):
                if d is not None:  # a missing file is reported below, by the caller
                    check(k, d)
        return [parse_json(join(self.root, k), d) for k, d in zip(keys, datas, strict=True)]

    @abc.abstractmethod
    def exists(self, key: str = "") -> bool:
        """Whether the file ``key`` exists; ``""``: whether the location holds anything."""

    @abc.abstractmethod
    def is_dir(self) -> bool:
        """A directory, or a prefix holding at least one object."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every file (object) under the location, relative to it."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """The names directly inside the location, sorted; empty when it does not exist."""

    @abc.abstractmethod
    def missing(self, keys: list[str]) -> list[str]:
        """The ``keys`` (files written under the location) that are not there now."""

    @abc.abstractmethod
    def size(self) -> int | None:
        """The bytes the location takes; None where knowing costs more than a listing."""

    @abc.abstractmethod
    def count(self) -> int | None:
        """The files under the location; None where counting would cost a listing."""

    # ------------------------------------------------------------------------ writing

    @abc.abstractmethod
    def make_dirs(self) -> None:
        """Makes the location exist (a prefix exists once something is written under it)."""

    @abc.abstractmethod
    def write_many(self, files: dict[str, bytes]) -> None:
        """Writes small files (a save's metadata); durable after :meth:`make_durable`."""

    @abc.abstractmethod
    def write_durable(self, key: str, data: bytes) -> None:
        """Writes ``key`` and returns once it is durable (fsync, or an acknowledged PUT)."""

    @abc.abstractmethod
    def write_atomic(self, key: str, data: bytes) -> None:
        """Replaces ``key`` atomically: readers see the old or the new bytes (not synced)."""

    @abc.abstractmethod
    def make_durable(self) -> None:
        """Every byte written under the location is durable."""

    @abc.abstractmethod
    def delete(self, key: str = "") -> None:
        """Removes ``key`` (a file, or everything under it); ``""``: the whole location. A
        missing one is no error."""

    @abc.abstractmethod
    def link(self, src: str, name: str) -> bool:
        """Makes ``name`` here hold the same bytes as ``name`` in the committed checkpoint
        ``src``, without sending them through this process; False where the store cannot (the
        caller then writes them afresh), or ``src`` holds no such regular file. The caller
        vouches that ``src`` is committed and ``name`` unchanged since its save."""

    def open_array(
        self,
        rel: str,
        meta: dict[str, Any],
        *,
        create: bool,
        peer_creates: bool = False,
        assume: bool = True,
        fill_missing: bool = False,
    ) -> ts.Future:
        """Opens the zarr array at ``rel`` to read, or with ``create`` to write.

        ``peer_creates``: another process writes its ``zarr.json`` (a multi-process save), this
        one only writes chunks; ``assume=False`` reads its zarr.json, which must agree with
        ``meta`` (``{}``: any array), instead of trusting ``meta``; ``fill_missing`` reads a
        missing chunk as zeros (an array whose record lists absent zero chunks), else it is an
        error.
        """
        spec: dict[str, Any] = {
            "driver": "zarr3",
            "kvstore": self.kvstore_spec(rel),
            "metadata": {k: v for k, v in meta.items() if k not in ("zarr_format", "node_type")},
        }
        context = _runtime.context()
        if not create:
            spec["fill_missing_data_reads"] = fill_missing
            return ts.open(spec, open=True, assume_metadata=assume, read=True, context=context)
        # Every chunk is written, zeros included: no record lists chunks TensorStore skipped.
        spec["store_data_equal_to_fill_value"] = True
        if peer_creates:
            return ts.open(spec, open=True, assume_metadata=True, write=True, context=context)
        return self._create_array(rel, meta, spec)

    @abc.abstractmethod
    def _create_array(self, rel: str, meta: dict[str, Any], spec: dict[str, Any]) -> ts.Future:
        """Writes the array's ``zarr.json`` and opens ``spec`` to write (the cheapest way the
        store allows)."""

    # ------------------------------------------------------------------------ checkpoints

    @abc.abstractmethod
    def is_committed(self) -> bool:
        """Whether the location is a committed checkpoint (it holds ``COMMIT``)."""

    @abc.abstractmethod
    def occupied(self) -> bool:
        """Whether the location holds something a save must not overwrite nor delete (an
        interrupted save's debris, its writer gone, does not count)."""

    @abc.abstractmethod
    def temporary(self) -> Store:
        """Where a save to this location writes before its commit."""

    @abc.abstractmethod
    def begin(self) -> Lock:
        """Makes the temporary location a save writes into, held until the save commits or
        gives up (release the lock then)."""

    @abc.abstractmethod
    def commit(self, final: Store) -> None:
        """Makes this temporary location appear as ``final`` atomically; ``COMMIT`` inside it
        is already durable."""

    @abc.abstractmethod
    def retire(self) -> Store | None:
        """Makes a committed checkpoint stop being one; returns what is left to
        :meth:`delete` later, if anything."""

    @abc.abstractmethod
    def remove_if_abandoned(self) -> bool:
        """Removes an uncommitted save's location (or a debris-named file) unless a live
        process still writes there; returns whether it did."""

    @abc.abstractmethod
    def hold_writer(self) -> str | None:
        """Takes a run directory's writer lock, where the store has locks; returns the key
        :meth:`release_writer` takes."""

    def release_writer(self, key: str) -> None:
        leases.release_run(key)

    def confined(self) -> Any:
        """What checks that files a checkpoint's metadata names lie inside it
        (:class:`jaxckpt.storage.confine.Confined`); a store without links has nothing to
        check."""
        return Unconfined()

    # ------------------------------------------------------------------------ errors

    def save_error(self, e: BaseException, what: str = "") -> BaseException:
        """``e`` as a save reports it (a local file system's error as a sentence)."""
        return e

    @abc.abstractmethod
    def explain(self, detail: str) -> str:
        """What was tried and the fix, for a storage error whose text is ``detail``."""


__all__ = ["COMMIT", "PENDING", "TMP_MARK", "Store", "is_debris", "join", "parse_json"]
