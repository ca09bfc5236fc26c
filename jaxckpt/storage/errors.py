"""Storage errors as sentences: what failed, where (the checkpoint and the array), and the fix.

A local file system's ``OSError`` becomes a ``StorageError`` whose text the errno calls for
(:func:`local_error`); a TensorStore error becomes a ``CheckpointError`` saying what was tried
(the store's :meth:`~jaxckpt.storage.base.Store.explain`).
"""

from __future__ import annotations

import errno
import os
import re

from jaxckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
)
from jaxckpt.storage.base import TMP_MARK


def save_error(where: str, e: BaseException, what: str = "") -> BaseException:
    """``e`` as a save to ``where`` reports it: a local file system's error (an ``OSError``
    with an errno) as the ``StorageError`` naming ``where`` and the fix; any other as it is."""
    from jaxckpt.storage import at

    return at(where).save_error(e, what)


def storage_error(where: str, e: Exception, what: str = "") -> CheckpointError:
    """A permanent storage error (retries are TensorStore's), naming the location and the
    array."""
    from jaxckpt.storage import at

    store = at(where)
    local = store.save_error(e, what)
    if isinstance(local, StorageError):
        return local
    of = f" (the array {what!r})" if what else ""
    detail = re.sub(r" \[tensorstore_spec='.*?'\]", "", str(e))  # the JSON spec buries the cause
    msg = f"Accessing {where}{of} failed: {detail.rstrip('.')}." + store.explain(detail)
    if str(e).startswith("NOT_FOUND") and "http_response_code='404'" in str(e):  # no bucket
        return CheckpointNotFoundError(msg)
    return CheckpointError(msg)


def read_error(root: str, path: str, e: Exception) -> CheckpointError:
    """A failed read of the array ``path``: the store's error, or damage to the bytes."""
    if _unreachable(e):  # the store refused or failed after its retries: not the bytes' fault
        return storage_error(root, e, path)
    return CorruptCheckpointError(
        f"Reading the array {path!r} of {root} failed: {e}. The checkpoint is damaged (a chunk "
        "fails its crc32c checksum or is missing). Fix: restore an earlier checkpoint, or run "
        f"`jaxckpt verify {root}` to list every damaged array."
    )


def _unreachable(e: Exception) -> bool:
    """Whether a TensorStore error comes from the storage service rather than the bytes read."""
    msg = str(e)
    return "http_response_code" in msg or msg.startswith(("UNAVAILABLE", "PERMISSION_DENIED"))


_TMP_NAME = re.compile(re.escape(TMP_MARK) + "[0-9a-f]{12}")


def local_error(path: str, e: OSError, what: str = "") -> StorageError:
    """A local file system error writing ``path`` as a sentence with the fix its errno calls
    for, naming ``path``: a save's temporary name is shown as the checkpoint's own path (the
    one the caller gave; nothing is left under the other)."""
    where = _TMP_NAME.sub("", path)
    parent = os.path.dirname(where)
    head = f"Writing {where}" + (f" (the array {what!r})" if what else "") + " failed"
    code = e.errno
    blocker = _file_above(where) if code in (errno.ENOTDIR, errno.EEXIST) else None
    if code == errno.EROFS:
        msg = (
            f"{head}: its file system is read-only. Fix: save to a writable directory, or "
            "remount that file system read-write."
        )
    elif code in (errno.EACCES, errno.EPERM):
        msg = (
            f"{head}: permission denied. Fix: give the user running this write access to "
            f"{parent}, or save elsewhere."
        )
    elif blocker is not None:
        msg = (
            f"{head}: {blocker} is a file, not a directory. Fix: choose a path whose parents "
            "are directories, or move that file away."
        )
    elif code == errno.ENAMETOOLONG:
        name = max(where.split("/"), key=lambda n: len(n.encode()))
        shown = name if len(name) <= 40 else name[:40] + "..."
        msg = (
            f"{head}: the name {shown!r} is {len(name.encode())} bytes, too long for the file "
            f"system (most allow 255 bytes per name, and a save first writes under a name "
            f"{len(TMP_MARK) + 12} bytes longer). Fix: use a shorter name."
        )
    elif code == errno.ENOENT:
        msg = (
            f"{head}: a directory it was writing into was removed meanwhile. Fix: make sure "
            f"nothing else (a cleanup job, another manager of {parent}) removes files there "
            "while jaxckpt writes, then save again."
        )
    else:
        msg = (
            f"{head}: {e.strerror or e}. Fix: check the free space and the permissions of {parent}."
        )
    error = StorageError(msg)
    error.errno = code  # str(error) stays the sentence: no strerror is set
    return error


def _file_above(path: str) -> str | None:
    """The nearest of ``path`` and its parents that exists, when it is not a directory."""
    while True:
        if os.path.lexists(path):
            return None if os.path.isdir(path) else path
        up = os.path.dirname(path)
        if up == path:
            return None
        path = up


__all__ = ["local_error", "read_error", "save_error", "storage_error"]
