"""Storage: where checkpoints live, behind one interface (:class:`Store`).

:func:`at` is the one place that reads a location's spelling: an absolute or relative local
path is a :class:`~jaxckpt.storage.local.LocalStore` (the fast path: chunk files through
``os`` calls, ``syncfs``, rename to commit); ``s3://BUCKET/PREFIX``, ``gs://BUCKET/PREFIX``
and ``memory://NAME/PREFIX`` are :class:`~jaxckpt.storage.kvstore.KvStore` prefixes
(TensorStore's ``s3``, ``gcs`` and ``memory`` kvstores). The commit protocol, as the calls a
save makes in order, is in :mod:`jaxckpt.storage.base`.
"""

from __future__ import annotations

import os

from jaxckpt.storage.base import COMMIT, PENDING, TMP_MARK, Store, is_debris, join, parse_json
from jaxckpt.storage.errors import local_error, read_error, save_error, storage_error
from jaxckpt.storage.kvstore import DRIVERS, KvStore, set_storage_options
from jaxckpt.storage.local import LocalStore


def at(path: str | os.PathLike[str]) -> Store:
    """The store of the location ``path``: a local directory, or a kvstore prefix by its URL
    scheme (``s3://``, ``gs://``, ``memory://``)."""
    p = os.fspath(path)
    head, sep, _ = p.partition("://")
    return KvStore(p) if sep and head in DRIVERS else LocalStore(p)


def normalize(path: str | os.PathLike[str]) -> str:
    """An absolute local path, or a URL without empty segments nor a trailing ``/``."""
    p = os.fspath(path)
    head, sep, rest = p.partition("://")
    if not sep:
        return os.path.abspath(p)
    if head not in DRIVERS:
        raise ValueError(_unknown(p, head))
    parts = [s for s in rest.split("/") if s]
    if not parts:
        raise ValueError(f"{p!r} names no bucket. Fix: write {head}://BUCKET/PREFIX.")
    return f"{head}://" + "/".join(parts)


def _unknown(p: str, head: str) -> str:
    return (
        f"{p!r} uses the scheme {head!r}; jaxckpt reads and writes local paths, s3:// and "
        "gs:// URLs. Fix: use one of those."
    )


__all__ = [
    "COMMIT",
    "PENDING",
    "TMP_MARK",
    "KvStore",
    "LocalStore",
    "Store",
    "at",
    "is_debris",
    "join",
    "local_error",
    "normalize",
    "parse_json",
    "read_error",
    "save_error",
    "set_storage_options",
    "storage_error",
]
