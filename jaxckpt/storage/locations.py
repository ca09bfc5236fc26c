"""Where checkpoints live: local directories and object-store prefixes (``s3://``, ``gs://``).

Every function takes a location string: an absolute local path, or a URL such as
``s3://bucket/run/ckpt-10`` or ``gs://bucket/run/ckpt-10``. Bytes travel through TensorStore's
``file``, ``s3`` and ``gcs`` key-value stores.

Commit protocol. A local save writes into a temporary sibling directory and renames it into
place. An object store has no rename, so a save writes at the final prefix: first a ``PENDING``
object (it marks the prefix as an unfinished save), then every array and metadata object, then
``COMMIT`` once all of those writes are acknowledged (an acknowledged PUT is durable), and last
deletes ``PENDING``. Readers ignore a prefix without ``COMMIT``; a prefix with ``PENDING`` and
no ``COMMIT`` is debris that the next save to it, or a manager, deletes by prefix.

Endpoints and credentials follow the conventions of the AWS and Google clients (see
``docs/object_stores.md``); :func:`set_storage_options` adds or overrides TensorStore spec
members for every ``s3://`` or ``gs://`` location.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import tensorstore as ts

from .. import _runtime
from .._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
)
from .._log import phase
from . import leases as _leases
from . import object_stores as _object_stores
from .chunk_files import fsync_path

COMMIT = "COMMIT"
PENDING = "PENDING"
TMP_MARK = ".jaxckpt-tmp-"
_DRIVERS = {"s3": "s3", "gs": "gcs"}
log = logging.getLogger("jaxckpt")


def set_storage_options(scheme: str, **spec: Any) -> None:
    """Sets TensorStore kvstore spec members used for every ``s3://`` or ``gs://`` location.

    They override what jaxckpt derives from the environment (``AWS_ENDPOINT_URL_S3``,
    ``AWS_REGION``, ...). Called with no members, it restores the defaults.

    Args:
        scheme: ``"s3"`` or ``"gs"``.
        **spec: members of TensorStore's ``s3`` or ``gcs`` kvstore spec, e.g. ``endpoint``,
            ``aws_region``, ``host_header``, ``aws_credentials``, ``requester_pays``, or the
            context resources ``s3_request_retries`` / ``gcs_request_retries`` (jaxckpt's
            default, 6 retries 1 s to 16 s apart, gives up on an unreachable store within
            about a minute) and ``s3_request_concurrency`` / ``gcs_request_concurrency``.

    Example:
        >>> jc.set_storage_options("s3", endpoint="http://127.0.0.1:9000",
        ...                        s3_request_retries={"max_retries": 8})  # doctest: +SKIP
    """
    if scheme not in _runtime.storage_options:
        raise ValueError(
            f"scheme must be one of {sorted(_runtime.storage_options)}, got {scheme!r}"
        )
    _runtime.storage_options[scheme] = dict(spec)


# ---------------------------------------------------------------------------- naming


def scheme_of(root: str) -> str | None:
    """``"s3"`` or ``"gs"`` for an object-store URL, None for a local path."""
    head, sep, _ = root.partition("://")
    return head if sep and head in _DRIVERS else None


def is_url(root: str) -> bool:
    return scheme_of(root) is not None


def is_local(root: str) -> bool:
    """Whether ``root`` is a local directory (not an object-store URL)."""
    return scheme_of(root) is None


def _split(root: str) -> tuple[str, str, str]:
    scheme = scheme_of(root)
    assert scheme is not None
    bucket, _, prefix = root[len(scheme) + 3 :].partition("/")
    return scheme, bucket, prefix


def normalize(path: str | os.PathLike[str]) -> str:
    """An absolute local path, or a URL without empty segments nor a trailing ``/``."""
    p = os.fspath(path)
    head, sep, rest = p.partition("://")
    if not sep:
        return os.path.abspath(p)
    if head not in _DRIVERS:
        raise ValueError(
            f"{p!r} uses the scheme {head!r}; jaxckpt reads and writes local paths, s3:// and "
            "gs:// URLs. Fix: use one of those."
        )
    parts = [s for s in rest.split("/") if s]
    if not parts:
        raise ValueError(f"{p!r} names no bucket. Fix: write {head}://BUCKET/PREFIX.")
    return f"{head}://" + "/".join(parts)


def join(root: str | os.PathLike[str], name: str) -> str:
    """``root/name``, keeping ``root`` as the caller spelled it (relative paths stay relative)."""
    return os.fspath(root).rstrip("/") + "/" + name


def kvstore(root: str) -> dict[str, Any]:
    """The TensorStore kvstore spec of the directory or prefix ``root`` (path ends in ``/``)."""
    scheme = scheme_of(root)
    if scheme is None:
        return {"driver": "file", "path": root.rstrip("/") + "/"}
    _, bucket, prefix = _split(root)
    spec: dict[str, Any] = {"driver": _DRIVERS[scheme], "bucket": bucket}
    spec[_object_stores.RETRY_MEMBER[scheme]] = dict(_object_stores.RETRIES)  # bounded waits
    spec.update(_s3_env() if scheme == "s3" else _gcs_env())
    spec.update(_runtime.storage_options[scheme])
    spec["path"] = prefix + "/" if prefix else ""
    return spec


def _s3_env() -> dict[str, Any]:
    """What boto3 would read from the environment that TensorStore's s3 driver does not."""
    env = os.environ
    out: dict[str, Any] = {}
    ignore = env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    endpoint = None if ignore else env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if endpoint:
        out["endpoint"] = endpoint
        region = region or "us-east-1"  # S3-compatible stores accept it; signatures need one
    if region:
        out["aws_region"] = region
    credentials = _object_stores.aws_credentials()
    if credentials is not None:
        out["aws_credentials"] = credentials
    return out


def _gcs_env() -> dict[str, Any]:
    """``STORAGE_EMULATOR_HOST`` (google-cloud-storage's emulator variable) for TensorStore."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host and "TENSORSTORE_GCS_HTTP_URL" not in os.environ:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"
        # The client library sends no credentials to an emulator; TensorStore needs a token.
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    return {}


def open_kv(root: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore(root), context=_runtime.context()).result()


def save_error(where: str, e: BaseException, what: str = "") -> BaseException:
    """``e`` as a save to ``where`` reports it: a local file system's error (an ``OSError``
    with an errno) as the ``StorageError`` naming ``where`` and the fix; any other as it is."""
    if (
        isinstance(e, OSError)
        and not isinstance(e, CheckpointError)
        and e.errno is not None
        and is_local(where)
    ):
        return local_error(where, e, what)
    return e


def storage_error(where: str, e: Exception, what: str = "") -> CheckpointError:
    """A permanent storage error (retries are TensorStore's), naming the URL and the array."""
    local = save_error(where, e, what)
    if isinstance(local, StorageError):
        return local
    of = f" (the array {what!r})" if what else ""
    detail = re.sub(r" \[tensorstore_spec='.*?'\]", "", str(e))  # the JSON spec buries the cause
    msg = f"Accessing {where}{of} failed: {detail.rstrip('.')}."
    scheme = scheme_of(where)
    if scheme is not None:  # what was tried (endpoint, credentials, retries) and the fix
        msg += _object_stores.explain(
            scheme, kvstore(where), _runtime.storage_options[scheme], detail
        )
    else:
        msg += " Fix: check the free space and the permissions of that directory."
    if str(e).startswith("NOT_FOUND") and "http_response_code='404'" in str(e):  # no bucket
        return CheckpointNotFoundError(msg)
    return CheckpointError(msg)


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


def _remote(root: str, fn: Any) -> Any:
    try:
        return fn(open_kv(root))
    except ValueError as e:
        raise storage_error(root, e) from e


def _read(root: str, key: str) -> bytes | None:
    r = _remote(root, lambda kv: kv.read(key).result())
    return r.value if r.state == "value" else None


def list_keys(root: str) -> list[str]:
    """Every key under an object store prefix, relative to it."""
    return [k.decode() for k in _remote(root, lambda kv: kv.list().result())]


# ---------------------------------------------------------------------------- one location


def tmp_sibling(final: str) -> str:
    """Where a save writes before its commit: a sibling directory, or ``final`` itself remotely."""
    if is_url(final):
        return final
    parent, name = os.path.split(final)
    return os.path.join(parent, f"{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def exists(root: str, key: str = "") -> bool:
    if is_url(root):
        return _read(root, key) is not None if key else is_dir(root)
    return os.path.exists(os.path.join(root, key))


def is_committed(root: str) -> bool:
    if is_url(root):
        return _read(root, COMMIT) is not None
    return os.path.isfile(os.path.join(root, COMMIT))


def is_dir(root: str) -> bool:
    """A local directory, or a prefix holding at least one object."""
    if is_url(root):
        return bool(list_keys(root))
    return os.path.isdir(root)


def occupied(final: str) -> bool:
    """Whether ``final`` holds something a save must not overwrite nor delete.

    An empty or absent location is free, and so is an object-store prefix holding only the
    debris of an interrupted save (``PENDING`` without ``COMMIT``, its writer gone).
    """
    if is_url(final):
        keys = list_keys(final)
        if not keys or COMMIT in keys:
            return bool(keys)
        pending = _read(final, PENDING) if PENDING in keys else None
        return pending is None or not _leases.owner_gone(pending)
    return os.path.isdir(final) and bool(os.listdir(final))


def remove_tree(root: str) -> None:
    """Deletes a directory tree, or every object under the prefix ``root/``."""
    if is_url(root):
        if not _split(root)[2]:
            raise ValueError(f"refusing to delete every object of the bucket {root}")
        _remote(root, lambda kv: kv.delete_range(ts.KvStore.KeyRange()).result())
    else:
        shutil.rmtree(root, ignore_errors=True)


def begin(tmp: str) -> _leases.Lock:
    """Makes the place a save writes into: a fresh directory, locked until the save commits or
    gives up (release the returned lock then), or a prefix marked ``PENDING`` with its writer."""
    if is_url(tmp):
        remove_tree(tmp)  # debris of an interrupted save, if any (``occupied`` was checked)
        write_bytes_durable(tmp, PENDING, _leases.owner_record())
        return _leases.Lock(None)
    os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
    return _leases.make_locked_dir(tmp)


@phase("save: committed")
def commit(tmp: str, final: str) -> None:
    """Makes ``tmp`` appear as ``final`` atomically; ``COMMIT`` inside it is already durable."""
    if is_url(final):  # the commit was COMMIT's PUT; a PENDING left beside it is harmless
        try:
            _remote(final, lambda kv: kv.write(PENDING, None).result())
        except CheckpointError as e:
            log.warning("jaxckpt: %s (the checkpoint is committed)", e)
        return
    fsync_path(tmp)
    os.rename(tmp, final)  # fails on a non-empty ``final``: never clobbers a checkpoint
    fsync_path(os.path.dirname(final))


# ---------------------------------------------------------------------------- small objects


def read_json(root: str, key: str) -> Any:
    return read_jsons(root, [key])[0]


def read_jsons(
    root: str, keys: list[str], check: Callable[[str, bytes | None], None] | None = None
) -> list[Any]:
    """The JSON files ``root/key``, read together: on the I/O threads, or as requests that an
    object store serves at once. ``check(key, data)`` sees each file's bytes before they are
    parsed; a missing file raises ``FileNotFoundError``."""
    if is_url(root):
        reads = _remote(root, lambda kv: [kv.read(k) for k in keys])
        try:
            found = [r.result() for r in reads]
        except ValueError as e:
            raise storage_error(root, e) from e
        datas = [r.value if r.state == "value" else None for r in found]
    else:
        paths = [os.path.join(root, k) for k in keys]
        datas = (
            list(_runtime.pool("read").map(_read_file, paths))
            if len(paths) > 1
            else [_read_file(paths[0])]
        )
    if check is not None:
        for k, d in zip(keys, datas, strict=True):
            if d is not None:  # a missing file is reported below, by the caller
                check(k, d)
    return [parse_json(join(root, k), d) for k, d in zip(keys, datas, strict=True)]


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def parse_json(where: str, data: bytes | None) -> Any:
    if data is None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", where)
    try:
        return json.loads(data)
    except ValueError as e:  # UnicodeDecodeError too: a damaged byte >= 0x80
        raise CorruptCheckpointError(
            f"{where} is not valid JSON ({e}); the checkpoint's metadata is damaged. Fix: restore "
            "an earlier checkpoint."
        ) from e


def write_bytes_durable(root: str, key: str, data: bytes) -> None:
    """Writes ``root/key`` and returns once it is durable (fsync, or an acknowledged PUT)."""
    if is_url(root):
        _remote(root, lambda kv: kv.write(key, data).result())
        return
    with open(os.path.join(root, key), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------- directories
# What CheckpointManager needs of a directory of checkpoints (a local directory or a prefix).


def list_names(root: str) -> list[str]:
    """The names directly inside ``root``, sorted; empty when ``root`` does not exist.

    On an object store this lists every key under the prefix (TensorStore lists without a
    delimiter) and keeps their first segments.
    """
    if is_url(root):
        return sorted({k.partition("/")[0] for k in list_keys(root)})
    try:
        return sorted(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []


def make_dirs(root: str) -> None:
    if not is_url(root):  # a prefix exists once something is written under it
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise local_error(root, e) from e


def is_debris(name: str) -> bool:
    """Whether ``name`` is left over by a local jaxckpt write that never committed."""
    return TMP_MARK in name


def remove_if_abandoned(path: str) -> bool:
    """Removes ``path``, an uncommitted save's directory or prefix (or a debris-named file),
    unless a live process still writes there; returns whether it did."""
    if is_url(path):
        if is_committed(path):
            return False
        pending = _read(path, PENDING)
        if pending is not None and not _leases.owner_gone(pending):
            return False
        remove(path)
        return True
    lock = _leases.claim_abandoned(path)
    if lock is None:
        return False
    try:
        remove(path)
    finally:
        lock.release()
    return True


def hold_writer(directory: str) -> str | None:
    """Takes a local run directory's writer lock (see :mod:`jaxckpt._leases`); an object
    store has none to take."""
    return None if is_url(directory) else _leases.hold_run(directory)


def release_writer(key: str) -> None:
    _leases.release_run(key)


def missing(root: str, keys: list[str]) -> list[str]:
    """The ``keys`` (files a save wrote under ``root``) that are not there now."""
    if is_url(root):
        have = set(list_keys(root))
        return [k for k in keys if k not in have]
    return [k for k in keys if not os.path.isfile(os.path.join(root, k))]


def remove(path: str) -> None:
    """Removes a file or a directory tree (an object and a prefix); a missing one is no error."""
    if is_url(path):
        parent, _, name = path.rpartition("/")
        remove_tree(path)
        _remote(parent, lambda kv: kv.write(name, None).result())
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def retire(path: str) -> str | None:
    """Makes a committed checkpoint stop being one, so that no crash leaves it half-deleted but
    listed; returns what is left to remove, if anything.

    Locally it is renamed to a debris name (one atomic step), which is returned: the caller may
    remove it later. On an object store it is marked ``PENDING`` and loses its ``COMMIT``
    before its other objects are deleted, all before this returns (a save may reuse the name).
    A crash in between leaves debris that the next manager removes.
    """
    if is_url(path):
        if is_committed(path):
            write_bytes_durable(path, PENDING, _leases.owner_record())
            _remote(path, lambda kv: kv.write(COMMIT, None).result())
        remove_tree(path)
        return None
    doomed = tmp_sibling(path)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return None
    return doomed


def read_bytes(root: str, key: str) -> bytes | None:
    """The bytes of ``root/key``, or None when it does not exist."""
    if is_url(root):
        return _read(root, key)
    try:
        with open(os.path.join(root, key), "rb") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def write_bytes_atomic(root: str, key: str, data: bytes) -> None:
    """Replaces ``root/key`` with ``data`` atomically: readers see the old or the new bytes.

    Not fsynced (for the manager's index, which is rebuilt from the checkpoints when it is
    stale or unreadable): an fsync there waits for the writes of a save still in flight.
    """
    if is_url(root):  # a PUT replaces an object atomically
        write_bytes_durable(root, key, data)
        return
    final = os.path.join(root, key)
    tmp = tmp_sibling(final)
    try:
        with open(tmp, "wb") as f:
            _leases.lock_file(f.fileno())  # not debris to another process while written
            f.write(data)
            os.replace(tmp, final)
    except BaseException as e:
        try:
            remove(tmp)
        except OSError:  # on a read-only disk even a missing file's unlink fails; e says why
            pass
        if isinstance(e, OSError) and e.errno is not None:
            raise local_error(final, e) from e
        raise
