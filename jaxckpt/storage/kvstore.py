"""Object stores through TensorStore kvstores: ``s3://``, ``gs://``, and ``memory://`` (the
process's own memory, for tests).

An object store has no rename and no locks, so a save writes at the final prefix: first a
``PENDING`` object naming its writer (:func:`jaxckpt.storage.leases.owner_record`), then every
array and metadata object, then ``COMMIT`` once all of those writes are acknowledged (an
acknowledged PUT is durable), and last deletes ``PENDING``. A prefix with ``PENDING`` and no
``COMMIT`` is debris that the next save to it, or a manager, deletes by prefix once its writer
is gone.

Endpoints and credentials follow the conventions of the AWS and Google clients (see
``docs/object_stores.md``); :func:`set_storage_options` adds or overrides TensorStore spec
members for every ``s3://`` or ``gs://`` location.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import tensorstore as ts

from jaxckpt import runtime as _runtime
from jaxckpt.errors import CheckpointError
from jaxckpt.log import phase
from jaxckpt.storage import leases, object_stores
from jaxckpt.storage.base import COMMIT, PENDING, Store
from jaxckpt.storage.chunk_files import json_bytes
from jaxckpt.storage.errors import storage_error

DRIVERS = {"s3": "s3", "gs": "gcs", "memory": "memory"}
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
    credentials = object_stores.aws_credentials()
    if credentials is not None:
        out["aws_credentials"] = credentials
    return out


def _gcs_env() -> dict[str, Any]:
    """``STORAGE_EMULATOR_HOST`` (google-cloud-storage's emulator variable) for TensorStore.

    TensorStore's ``gcs`` spec has no endpoint member (0.1.86 refuses ``endpoint`` and
    ``base_url``): it reads ``TENSORSTORE_GCS_HTTP_URL`` only, so that variable is set here,
    the one write to the environment in jaxckpt.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host and "TENSORSTORE_GCS_HTTP_URL" not in os.environ:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"
        # The client library sends no credentials to an emulator; TensorStore needs a token.
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    return {}


class KvStore(Store):
    """A prefix of a bucket, ``SCHEME://BUCKET/PREFIX`` (``memory://NAME/PREFIX``: the
    process's memory, shared by every open of the same TensorStore context)."""

    def __init__(self, root: str):
        super().__init__(root)
        self.scheme, _, rest = root.partition("://")
        self.bucket, _, self.prefix = rest.strip("/").partition("/")

    def os_path(self, key: str = "") -> str | None:
        return None

    def kvstore_spec(self, rel: str = "") -> dict[str, Any]:
        scheme = self.scheme
        path = "/".join(p for p in (self.prefix, rel) if p)
        if scheme == "memory":
            return {"driver": "memory", "path": "/".join((self.bucket, path)) + "/"}
        spec: dict[str, Any] = {"driver": DRIVERS[scheme], "bucket": self.bucket}
        spec[object_stores.RETRY_MEMBER[scheme]] = dict(object_stores.RETRIES)  # bounded waits
        spec.update(_s3_env() if scheme == "s3" else _gcs_env())
        spec.update(_runtime.storage_options[scheme])
        spec["path"] = path + "/" if path else ""
        return spec

    def _kv(self, fn: Any) -> Any:
        """``fn(kvstore)``, its TensorStore error as a sentence naming the location."""
        try:
            return fn(self.open_kv())
        except ValueError as e:
            raise storage_error(self.root, e) from e

    # ------------------------------------------------------------------------ reading

    def read(self, key: str) -> bytes | None:
        r = self._kv(lambda kv: kv.read(key).result())
        return r.value if r.state == "value" else None

    def read_range(self, key: str, offset: int, length: int) -> bytes | None:
        kv = self._kv(lambda kv: kv)
        # TensorStore refuses a range past the end: then what there is from offset, if any.
        for end in (offset + length, None):
            try:
                r = kv.read(key, byte_range=slice(offset, end)).result()
            except ValueError as e:
                if not str(e).startswith("OUT_OF_RANGE"):
                    raise storage_error(self.root, e) from e
                continue
            return r.value if r.state == "value" else None
        return b""

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        found = self._kv(lambda kv: [r.result() for r in [kv.read(k) for k in keys]])
        return [r.value if r.state == "value" else None for r in found]

    def exists(self, key: str = "") -> bool:
        return self.read(key) is not None if key else self.is_dir()

    def is_dir(self) -> bool:
        return bool(self.keys())

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self._kv(lambda kv: kv.list().result()))

    def names(self) -> list[str]:
        # TensorStore lists without a delimiter: every key under the prefix, first segments kept.
        return sorted({k.partition("/")[0] for k in self.keys()})

    def missing(self, keys: list[str]) -> list[str]:
        have = set(self.keys())
        return [k for k in keys if k not in have]

    def size(self) -> int | None:
        return None  # a listing gives no sizes

    def count(self) -> int | None:
        return None  # counting the keys would cost a listing

    # ------------------------------------------------------------------------ writing

    def make_dirs(self) -> None:
        pass  # a prefix exists once something is written under it

    def write_many(self, files: dict[str, bytes]) -> None:
        self._kv(lambda kv: [f.result() for f in [kv.write(k, v) for k, v in files.items()]])

    def write_durable(self, key: str, data: bytes) -> None:
        self._kv(lambda kv: kv.write(key, data).result())

    def write_atomic(self, key: str, data: bytes) -> None:
        self.write_durable(key, data)  # a PUT replaces an object atomically

    def make_durable(self) -> None:
        pass  # every PUT was acknowledged: it is durable

    def delete(self, key: str = "") -> None:
        if key:
            self.child(key).delete()
            return
        self._clear()
        parent, _, name = self.root.rpartition("/")
        KvStore(parent)._kv(lambda kv: kv.write(name, None).result())  # an object of that name

    def _clear(self) -> None:
        """Deletes every object under the prefix."""
        if not self.prefix:
            raise ValueError(f"refusing to delete every object of the bucket {self.root}")
        self._kv(lambda kv: kv.delete_range(ts.KvStore.KeyRange()).result())

    def link(self, src: str, name: str) -> bool:
        return False  # no server-side copy through TensorStore: the caller writes afresh

    def _create_array(self, rel: str, meta: dict[str, Any], spec: dict[str, Any]) -> ts.Future:
        """One PUT of ``zarr.json``, then the array opened on it with no request at all.

        ``create=True`` would first GET the metadata and, on S3, HEAD it before a conditional
        PUT (3 requests per array); the prefix is this save's own, so nothing there is lost.
        """
        put = self.open_kv().write(f"{rel}/zarr.json", json_bytes(meta))
        opened = ts.open(spec, open=True, assume_metadata=True, context=_runtime.context())
        promise, future = ts.Promise.new()  # type: ignore[var-annotated]

        def settle(_: Any) -> None:
            for f in (put, opened):
                if f.exception() is not None:
                    promise.set_exception(f.exception())
                    return
            promise.set_result(opened.result())

        put.add_done_callback(lambda _: opened.add_done_callback(settle))
        return future

    # ------------------------------------------------------------------------ checkpoints

    def is_committed(self) -> bool:
        return self.read(COMMIT) is not None

    def occupied(self) -> bool:
        keys = self.keys()
        if not keys or COMMIT in keys:
            return bool(keys)
        pending = self.read(PENDING) if PENDING in keys else None
        return pending is None or not leases.owner_gone(pending)

    def temporary(self) -> KvStore:
        return self  # no rename: a save writes at its final prefix, marked PENDING

    def begin(self) -> leases.Lock:
        self._clear()  # the debris of an interrupted save, if any (``occupied`` was checked)
        self.write_durable(PENDING, leases.owner_record())
        return leases.Lock(None)

    @phase("save: committed")
    def commit(self, final: Store) -> None:
        # The commit was COMMIT's PUT; a PENDING left beside it is harmless.
        try:
            self._kv(lambda kv: kv.write(PENDING, None).result())
        except CheckpointError as e:
            log.warning("jaxckpt: %s (the checkpoint is committed)", e)

    def retire(self) -> None:
        # Marked PENDING and stripped of its COMMIT before its other objects are deleted, all
        # before this returns (a save may reuse the name). A crash in between leaves debris
        # that the next manager removes.
        if self.is_committed():
            self.write_durable(PENDING, leases.owner_record())
            self._kv(lambda kv: kv.write(COMMIT, None).result())
        self._clear()
        return None

    def remove_if_abandoned(self) -> bool:
        if self.is_committed():
            return False
        pending = self.read(PENDING)
        if pending is not None and not leases.owner_gone(pending):
            return False
        self.delete()
        return True

    def hold_writer(self) -> str | None:
        return None  # an object store has no lock to take

    # ------------------------------------------------------------------------ errors

    def explain(self, detail: str) -> str:
        if self.scheme not in object_stores.RETRY_MEMBER:
            return " Fix: check the location."
        options = _runtime.storage_options[self.scheme]
        return object_stores.explain(self.scheme, self.kvstore_spec(), options, detail)


__all__ = ["KvStore", "set_storage_options"]
