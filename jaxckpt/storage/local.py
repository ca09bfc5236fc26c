"""A directory of the local file system: the fast path.

Chunk files are written and read with plain ``os`` calls (:mod:`jaxckpt.storage.chunk_files`,
on the paths :meth:`LocalStore.os_path` hands out), made durable by one ``syncfs``, and a save
is committed by renaming its temporary sibling directory into place. Locks that die with their
process (:mod:`jaxckpt.storage.leases`) tell a live writer from debris.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from typing import Any

import tensorstore as ts

from jaxckpt import runtime as _runtime
from jaxckpt.errors import CheckpointError
from jaxckpt.log import phase
from jaxckpt.storage import chunk_files, errors, leases
from jaxckpt.storage.base import COMMIT, TMP_MARK, Store


class LocalStore(Store):
    """A local directory (``root``: a path, absolute or relative)."""

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key) if key else self.root

    def os_path(self, key: str = "") -> str | None:
        return self._path(key)

    def kvstore_spec(self, rel: str = "") -> dict[str, Any]:
        return {"driver": "file", "path": self._path(rel).rstrip("/") + "/"}

    # ------------------------------------------------------------------------ reading

    def read(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_range(self, key: str, offset: int, length: int) -> bytes | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        if len(keys) == 1:  # no thread hand-off for one file
            return [self.read(keys[0])]
        return list(_runtime.pool("read").map(self.read, keys))

    def exists(self, key: str = "") -> bool:
        return os.path.exists(self._path(key))

    def is_dir(self) -> bool:
        return os.path.isdir(self.root)

    def keys(self) -> list[str]:
        out = []
        for d, _, files in os.walk(self.root):
            rel = os.path.relpath(d, self.root)
            out += [n if rel == "." else f"{rel}/{n}" for n in files]
        return sorted(out)

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not os.path.isfile(self._path(k))]

    def size(self) -> int | None:
        total = 0
        for d, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(d, f)).st_size
                except OSError:
                    pass
        return total

    def count(self) -> int | None:
        return sum(len(files) for _, _, files in os.walk(self.root))

    # ------------------------------------------------------------------------ writing

    def make_dirs(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise errors.local_error(self.root, e) from e

    def write_many(self, files: dict[str, bytes]) -> None:
        # One thread, the directories first: the I/O threads contend for the directories' and
        # the file system's locks (and the GIL) more than they overlap (docs/speed.md).
        for d in sorted({os.path.dirname(k) for k in files} - {""}):
            os.makedirs(self._path(d), exist_ok=True)
        for k, data in files.items():
            chunk_files.write_file(self._path(k), [data])

    def write_durable(self, key: str, data: bytes) -> None:
        with open(self._path(key), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_atomic(self, key: str, data: bytes) -> None:
        # Not fsynced (for the manager's index, which is rebuilt from the checkpoints when it is
        # stale or unreadable): an fsync there waits for the writes of a save still in flight.
        final = self._path(key)
        tmp = _sibling(final)
        try:
            with open(tmp, "wb") as f:
                leases.lock_file(f.fileno())  # not debris to another process while written
                f.write(data)
                os.replace(tmp, final)
        except BaseException as e:
            try:
                _remove(tmp)
            except OSError:  # on a read-only disk even a missing file's unlink fails; e says why
                pass
            if isinstance(e, OSError) and e.errno is not None:
                raise errors.local_error(final, e) from e
            raise

    def make_durable(self) -> None:
        # A directory already gone was removed by peers that gave up on this save: the barrier
        # that follows says so better than a failed sync would.
        if os.path.isdir(self.root):
            chunk_files.make_durable(self.root)

    def delete(self, key: str = "") -> None:
        _remove(self._path(key))

    def link(self, src: str, name: str) -> bool:
        from jaxckpt.storage import at

        source = at(src).os_path(name)
        if source is None:  # not a file of this file system
            return False
        try:
            if not stat.S_ISREG(os.lstat(source).st_mode):
                return False  # a link or a directory: never what a save wrote
        except (FileNotFoundError, NotADirectoryError):
            return False
        dest = self._path(name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.link(source, dest, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.ENOENT):
                return False  # another file system, or one without hard links
            raise
        return True

    def _create_array(self, rel: str, meta: dict[str, Any], spec: dict[str, Any]) -> ts.Future:
        # open=True too: the fast path may have written this array's zarr.json already.
        return ts.open(spec, create=True, open=True, context=_runtime.context())

    def confined(self) -> Any:
        from jaxckpt.storage.confine import Confined

        return Confined(self.root)

    # ------------------------------------------------------------------------ checkpoints

    def is_committed(self) -> bool:
        return os.path.isfile(self._path(COMMIT))

    def occupied(self) -> bool:
        return os.path.isdir(self.root) and bool(os.listdir(self.root))

    def temporary(self) -> LocalStore:
        return LocalStore(_sibling(self.root))

    def begin(self) -> leases.Lock:
        os.makedirs(os.path.dirname(self.root) or ".", exist_ok=True)
        return leases.make_locked_dir(self.root)

    @phase("save: committed")
    def commit(self, final: Store) -> None:
        chunk_files.fsync_path(self.root)
        os.rename(self.root, final.root)  # fails on a non-empty ``final``: never clobbers one
        chunk_files.fsync_path(os.path.dirname(final.root))

    def retire(self) -> LocalStore | None:
        # Renamed to a debris name in one atomic step; the caller may remove it later.
        doomed = _sibling(self.root)
        try:
            os.rename(self.root, doomed)
        except FileNotFoundError:
            return None
        return LocalStore(doomed)

    def remove_if_abandoned(self) -> bool:
        lock = leases.claim_abandoned(self.root)
        if lock is None:
            return False
        try:
            _remove(self.root)
        finally:
            lock.release()
        return True

    def hold_writer(self) -> str | None:
        return leases.hold_run(self.root)

    # ------------------------------------------------------------------------ errors

    def save_error(self, e: BaseException, what: str = "") -> BaseException:
        if isinstance(e, OSError) and not isinstance(e, CheckpointError) and e.errno is not None:
            return errors.local_error(self.root, e, what)
        return e

    def explain(self, detail: str) -> str:
        return " Fix: check the free space and the permissions of that directory."


def _sibling(final: str) -> str:
    parent, name = os.path.split(final)
    return os.path.join(parent, f"{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def _remove(path: str) -> None:
    """Removes a file or a directory tree; a missing one is no error (even on a file system
    that refuses every unlink, read-only: a failed save cleans up after itself there too)."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


__all__ = ["LocalStore"]
