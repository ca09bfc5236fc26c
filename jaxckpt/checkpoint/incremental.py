"""Incremental saves: a chunk unchanged since a base checkpoint is hard-linked, not written.

Every local save of this process keeps a :class:`Record` of the chunk files it wrote or
linked (their inode, size, modification time and, when hashing, a BLAKE2b-128 digest of the
chunk's bytes) and of its ``jax.Array`` leaves (weak references). A later save given that
checkpoint as its ``base`` (a manager passes its previous save) then:

- links every chunk of a leaf that is the very same ``jax.Array`` object as at the base save
  (immutable, so unchanged; nothing is copied or hashed, not even snapshotted);
- links any other chunk whose digest equals the base's digest for the same key (NumPy leaves,
  new arrays with the old values, packs);
- writes everything else, and all of it when the base is not committed, not recorded by this
  process, or on an object store (no hard links there).

A link is made only to a file of a still-committed base (its ``COMMIT`` as recorded), and is
kept only if the new name leads to the very inode recorded, of the recorded size and
modification time: a file deleted, replaced or rewritten since is written afresh. The records
live in memory only: another process's checkpoint is never linked. :func:`link_file` is the
one place that makes a link.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxckpt import storage as _storage
from jaxckpt.errors import CheckpointError
from jaxckpt.format import checksum as _checksum
from jaxckpt.memory import as_bytes
from jaxckpt.storage import chunk_files as _chunks

log = logging.getLogger("jaxckpt")
DIGEST_BYTES = 16  # BLAKE2b-128: a chance collision is out of reach, unlike CRC-32C's 2^-32
KEEP = 8  # records kept per process (a manager needs its previous save's)


@dataclasses.dataclass(frozen=True)
class File:
    """A chunk file as it was written (or linked): what a later link must find again."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    digest: bytes | None  # of the chunk's bytes, without the checksum; None: not hashed
    crc: int | None = None  # their CRC-32C, where taken (a change is told by it cheaply)


@dataclasses.dataclass
class Leaf:
    """A ``jax.Array`` leaf of a save, at ``loc``."""

    ref: weakref.ref[Any]
    meta: dict[str, Any]
    zeros: set[int] = dataclasses.field(default_factory=set)  # flat indices left unwritten


class Record:
    """What one save of this process put at ``final`` (filled in while it writes)."""

    def __init__(self, final: str, hashing: bool):
        self.final = final
        self.hashing = hashing
        self.files: dict[str, File] = {}  # by key, relative to the checkpoint
        self.leaves: dict[str, Leaf] = {}
        self.commit: tuple[int, int, int] | None = None  # COMMIT's (dev, ino, mtime_ns)
        self.failed = False
        self.written = 0  # chunks' bytes (their checksums left out) written, and linked, here
        self.linked = 0
        self.lock = threading.Lock()

    def add(
        self,
        key: str,
        st: os.stat_result,
        digest: bytes | None,
        linked: bool,
        crc: int | None = None,
    ) -> None:
        f = File(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest, crc)
        with self.lock:
            self.files[key] = f
            if linked:
                self.linked += st.st_size - 4
            else:
                self.written += st.st_size - 4

    def still_committed(self) -> bool:
        """Committed, and its ``COMMIT`` is the one written then (not deleted, not re-saved)."""
        if self.commit is None or self.failed:
            return False
        try:
            st = os.lstat(os.path.join(self.final, _storage.COMMIT))
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_mtime_ns) == self.commit


_records: collections.OrderedDict[str, Record] = collections.OrderedDict()
_lock = threading.Lock()


def _register(rec: Record) -> None:
    with _lock:
        _records.pop(rec.final, None)
        _records[rec.final] = rec
        while len(_records) > KEEP:
            _records.popitem(last=False)


def stats(final: str) -> tuple[int, int] | None:
    """(bytes written, bytes linked) by this process's last save to ``final``, if recorded."""
    rec = _records.get(final)
    return None if rec is None else (rec.written, rec.linked)


class Unchanged:
    """A piece of the same ``jax.Array`` the base save had: linked, not snapshotted.

    ``data`` is kept to write the piece after all when the base cannot be linked."""

    __slots__ = ("data",)

    def __init__(self, data: Any):
        self.data = data


class Save:
    """One save's incremental state: its record and the base it links from."""

    def __init__(self, final: str, arrays: list[Any], base: str | None, hashing: bool):
        self.record = Record(final, hashing or base is not None)
        self.base: Record | None = None
        if base is not None:
            self.base = _records.get(_storage.normalize(base))
            if self.base is None or self.base.failed:
                log.info(
                    "jaxckpt: the save to %s writes every chunk: its base %s is no checkpoint "
                    "this process saved (or its save failed)",
                    final,
                    base,
                )
                self.base = None
        for a in arrays:
            if a.source is None:
                continue
            self.record.leaves[a.loc] = Leaf(a.source, a.meta)
            old = self.base.leaves.get(a.loc) if self.base is not None else None
            if old is not None and old.ref() is a.source() and old.meta == a.meta:
                for p in a.pieces:
                    p.data = Unchanged(p.data)
        _register(self.record)

    def linker(self, root: str) -> Linker:
        """The writer of this save's chunks into ``root`` (its temporary directory). Called
        once the base save has finished: saves write one at a time, in call order."""
        base = self.base if self.base is not None and self.base.still_committed() else None
        if self.base is not None and base is None:
            log.info(
                "jaxckpt: the save to %s writes every chunk: its base %s is no longer the "
                "committed checkpoint this process wrote",
                self.record.final,
                self.base.final,
            )
        self.base = None  # a chain of saves holds no chain of records
        return Linker(root, self.record, base)

    def finish(self, arrays: list[Any]) -> None:
        """After the writes: which chunks of each leaf were left out as zeros."""
        for a in arrays:
            leaf = self.record.leaves.get(a.loc)
            zero = a.record.get("zero_chunks")
            if leaf is not None and zero is not None:
                shape = a.meta["shape"]
                chunks = a.meta["chunk_grid"]["configuration"]["chunk_shape"]
                n = int(np.prod(_chunks.chunk_grid(shape, chunks)))
                leaf.zeros = _chunks.zero_set(zero, n)

    def committed(self) -> None:
        try:
            st = os.lstat(os.path.join(self.record.final, _storage.COMMIT))
        except OSError:
            self.record.failed = True
            return
        self.record.commit = (st.st_dev, st.st_ino, st.st_mtime_ns)

    def failed(self) -> None:
        self.record.failed = True
        self.base = None


def prepare(final: str, arrays: list[Any], base: str | None, hashing: bool) -> Save | None:
    """The incremental state of a save to ``final`` (None on an object store: nothing is
    linked there, and nothing recorded)."""
    if _storage.at(final).os_path() is None:
        return None
    if base is not None and _storage.at(base).os_path() is None:
        base = None
    return Save(final, arrays, base, hashing)


def link_file(src: str, dst: str, expect: File) -> os.stat_result | None:
    """Hard-links ``src`` at ``dst`` if ``dst`` then names the very file ``expect`` records
    (same device, inode, size and modification time); else leaves nothing at ``dst``."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        return None
    st = os.lstat(dst)
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
        expect.dev,
        expect.ino,
        expect.size,
        expect.mtime_ns,
    ):
        os.unlink(dst)
        return None
    return st


class Linker:
    """Writes or links the chunk files of one save into ``root``; records each one."""

    def __init__(self, root: str, record: Record, base: Record | None):
        self.root, self.record, self.base = root, record, base

    def _key(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def put(self, path: str, data: np.ndarray) -> None:
        """Writes one chunk file (what ``_chunks.write_chunk`` writes), or links the base's
        file of the same key when its bytes hash the same.

        A chunk whose CRC-32C differs from the base's has changed: it is written without
        hashing (a trained leaf costs no digest). An equal CRC is only a hint: the BLAKE2b
        digests must be equal too before anything is linked. A chunk with no earlier CRC is
        hashed, so that the next save can link it; one that changed and then stays the same
        is written once more (its digest taken then) before it is linked."""
        key = self._key(path)
        digest = crc = None
        if self.record.hashing:
            raw = as_bytes(data)
            crc = _checksum.crc32c(raw)
            old = self.base.files.get(key) if self.base is not None else None
            if old is None or old.crc is None or old.crc == crc:
                view = memoryview(raw)  # type: ignore[arg-type]
                digest = hashlib.blake2b(view, digest_size=DIGEST_BYTES).digest()
            if old is not None and digest is not None and old.digest == digest:
                if old.size == data.nbytes + 4:
                    st = link_file(os.path.join(self.base.final, key), path, old)  # type: ignore[union-attr]
                    if st is not None:
                        self.record.add(key, st, digest, linked=True, crc=crc)
                        return
        st = _chunks.write_chunk(path, data)
        if st is not None:  # None: a stand-in (a test's) that says nothing of the file
            self.record.add(key, st, digest, linked=False, crc=crc)

    def piece(
        self, loc: str, meta: dict[str, Any], p: Any, write: Callable[[], Any]
    ) -> list[tuple[int, ...]] | None:
        """Links the chunks of an :class:`Unchanged` piece from the base; where any is
        missing, writes the piece (``write``, which reads ``p.data``) instead. Returns what
        ``_chunks.write_piece`` does: the all-zero chunks left out."""
        done = self._link_piece(loc, meta, p.index)
        if done is not None:
            return done
        p.data = p.data.data
        try:
            return write()
        except RuntimeError as e:
            if not getattr(p.data, "is_deleted", lambda: False)():
                raise
            raise CheckpointError(
                f"The save to {self.record.final} could not link the unchanged array {loc!r} "
                "from the previous checkpoint (deleted or damaged since), and the array itself "
                "was deleted (donated) after the save was called, so its bytes are gone. "
                "Nothing was committed. Fix: save again; keep a checkpoint's files in place "
                "while the next save runs."
            ) from e

    def _link_piece(
        self, loc: str, meta: dict[str, Any], index: Any
    ) -> list[tuple[int, ...]] | None:
        base = self.base
        old = base.leaves.get(loc) if base is not None else None
        if base is None or old is None:
            return None
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        plan = _chunks.piece_chunks(shape, chunks, index)
        if plan is None:
            return None
        grid = _chunks.chunk_grid(shape, chunks)
        zeros: list[tuple[int, ...]] = []
        made: list[tuple[str, os.stat_result, File]] = []
        for coords, _, _ in plan:
            if _chunks.flat_index(coords, grid) in old.zeros:
                zeros.append(coords)
                continue
            key = f"{loc}/{_chunks.chunk_key(coords)}"
            f = base.files.get(key)
            dst = os.path.join(self.root, key)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            st = None if f is None else link_file(os.path.join(base.final, key), dst, f)
            if st is None or f is None:
                for path, _, _ in made:  # the piece is written whole: no shared file reopened
                    os.unlink(path)
                return None
            made.append((dst, st, f))
        for dst, st, f in made:
            self.record.add(self._key(dst), st, f.digest, linked=True, crc=f.crc)
        return zeros
