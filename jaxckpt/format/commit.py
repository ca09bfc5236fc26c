"""``COMMIT``: the file a save writes last. It holds the CRC-32C of every ``zarr.json`` the save
wrote, and of itself, so that a reader catches damaged metadata before trusting it.

Since format version 3, ``COMMIT`` is the JSON object
``{"format_version": 3, "zarr_json_crc32c": {"zarr.json": 1234, "params/zarr.json": ...},
"crc32c": 5678}``: the keys of ``zarr_json_crc32c`` are the files' paths in the checkpoint,
and ``crc32c`` (the last member) is the CRC-32C of the file's bytes before its key (see
:func:`jaxckpt.format.checksum.seal`). Versions 1 and 2 wrote ``{}``: such a checkpoint is read
without metadata checksums (as those versions were).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from jaxckpt import storage as _storage
from jaxckpt.errors import CorruptCheckpointError, FormatVersionError
from jaxckpt.format import checksum as _checksum
from jaxckpt.format.metadata import FORMAT_VERSION
from jaxckpt.storage import chunk_files as _chunks

FIRST = 3  # the first format version whose COMMIT holds checksums
LEGACY = b"{}"  # what versions 1 and 2 wrote
_FIX = "Fix: restore an earlier checkpoint, or copy this checkpoint again in full."


def commit_bytes(
    files: dict[str, Any], arrays: Iterable[Any] = (), packs: Iterable[Any] = ()
) -> bytes:
    """The ``COMMIT`` of a save that wrote ``files`` (``{path: bytes or JSON value}``: the
    root and group ``zarr.json``) and the ``zarr.json`` of ``arrays`` and ``packs`` (each with
    ``.loc`` and ``.meta``), each JSON value as :func:`jaxckpt._chunks.json_bytes` encodes it."""
    sums = {
        k: _checksum.crc32c_bytes(v if isinstance(v, bytes) else _chunks.json_bytes(v))
        for k, v in files.items()
    }
    for a in [*arrays, *packs]:
        sums[f"{a.loc}/zarr.json"] = _checksum.crc32c_bytes(_chunks.json_bytes(a.meta))
    body = {"format_version": FORMAT_VERSION, "zarr_json_crc32c": dict(sorted(sums.items()))}
    return _checksum.seal(_chunks.json_bytes(body))


class Commit:
    """A checkpoint's parsed ``COMMIT``: ``check(key, data)`` raises ``CorruptCheckpointError``
    unless ``data`` are the bytes the save wrote to ``key``."""

    def __init__(self, root: str, data: bytes):
        self.root = root
        self.checksums: dict[str, int] | None = None  # None: a version 1 or 2 checkpoint
        if data == LEGACY:
            return
        where = _storage.join(root, _storage.COMMIT)
        if not _checksum.is_sealed(data):
            raise CorruptCheckpointError(
                f"{where} is damaged: it fails its own crc32c checksum (it holds the checksums "
                f"of the checkpoint's metadata, written last by the save). {_FIX}"
            )
        try:
            doc = json.loads(data)
        except ValueError:  # sealed, yet not JSON: not a file jaxckpt wrote
            doc = None
        version = doc.get("format_version") if isinstance(doc, dict) else None
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise FormatVersionError(
                f"{root} was written in jaxckpt format version {version}, but this jaxckpt reads "
                f"versions up to {FORMAT_VERSION}. Fix: upgrade jaxckpt (pip install -U jaxckpt)."
            )
        sums = doc.get("zarr_json_crc32c") if isinstance(doc, dict) else None
        if not isinstance(version, int) or version < FIRST or not isinstance(sums, dict):
            raise CorruptCheckpointError(
                f"{where} does not hold the checksums of the checkpoint's metadata. {_FIX}"
            )
        self.checksums = sums

    def check(self, key: str, data: bytes | None) -> None:
        """Raises ``CorruptCheckpointError`` naming ``root/key`` when ``data`` (None: the file
        is missing) is not what the save wrote there. A version 2 checkpoint checks nothing."""
        if self.checksums is None:
            return
        where = _storage.join(self.root, key)
        want = self.checksums.get(key)
        if want is None:
            raise CorruptCheckpointError(
                f"{where} is not among the files {_storage.join(self.root, _storage.COMMIT)} "
                f"lists, so the checkpoint's metadata is damaged. {_FIX}"
            )
        if data is None:
            raise CorruptCheckpointError(
                f"{where} is missing: the checkpoint's metadata is damaged. {_FIX}"
            )
        if _checksum.crc32c_bytes(data) != want:
            raise CorruptCheckpointError(
                f"{where} is damaged: it fails the crc32c checksum that {_storage.COMMIT} "
                f"records for it. {_FIX}"
            )

    def require(self, version: Any) -> None:
        """A root ``zarr.json`` of format version 3 or later comes with checksums."""
        if self.checksums is None and isinstance(version, int) and version >= FIRST:
            raise CorruptCheckpointError(
                f"{_storage.join(self.root, _storage.COMMIT)} is damaged: it holds no checksums, "
                f"but {_storage.join(self.root, 'zarr.json')} says format version {version!r}, "
                f"whose COMMIT holds them. {_FIX}"
            )
