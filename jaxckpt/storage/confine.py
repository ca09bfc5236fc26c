"""Where a checkpoint's metadata may lead a reader: paths and the links on a local disk.

Checkpoints are downloaded from strangers (a model hub, a colleague's bucket) and opened by jobs
that can read everything else on the host, so every path a checkpoint's metadata names must
stay inside the checkpoint: syntactically first (no I/O), then on a local disk through the links
it meets. docs/format.md lists the rules ("What a reader enforces"). A broken rule is a
:class:`Violation`, which the reader turns into a ``CorruptCheckpointError`` naming the
checkpoint and the leaf.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import stat
from collections.abc import Callable
from typing import Any

from jaxckpt.errors import CorruptCheckpointError


class Violation(ValueError):
    """A record or a file of a checkpoint breaks a rule a reader enforces."""


def error(root: str, path: str, keystr: str, problem: str) -> CorruptCheckpointError:
    """The error a reader raises for a leaf whose record or files break a rule."""
    return CorruptCheckpointError(
        f"The checkpoint {root} is damaged or was crafted: the leaf {keystr} ({path!r}) "
        f"{problem}. jaxckpt reads nothing a checkpoint's metadata names before checking it "
        '(see "What a reader enforces" in docs/format.md). Fix: restore an earlier checkpoint, '
        "or get this one again from a source you trust."
    )


def path_problem(loc: Any) -> str | None:
    """What makes ``loc`` (a path from a record) unsafe to join to the checkpoint's path."""
    if not isinstance(loc, str):
        return f"has the loc {_short(loc)}, which is not a path"
    return _loc_problem(loc)


@functools.lru_cache(maxsize=4096)  # packed leaves share their pack's loc
def _loc_problem(loc: str) -> str | None:
    if (
        not loc
        or loc.startswith("/")
        or "\\" in loc
        or "\x00" in loc
        or any(s in ("", ".", "..") for s in loc.split("/"))
    ):
        return (
            f"has the loc {_short(loc)}, which does not stay inside the checkpoint (a loc is a "
            "relative path of non-empty names, none of them '.' or '..', without '\\' or NUL)"
        )
    return None


def _json(x: Any) -> str:
    s = json.dumps(x, separators=(", ", ": "))
    return s if len(s) <= 80 else s[:77] + "..."


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


class Confined:
    """The directories of a local checkpoint found to lie inside it.

    Each directory is looked at once (an ``lstat``); a symbolic link met on the way must
    resolve inside the checkpoint. Syntax (:func:`path_problem`) is checked before: this
    only follows what is on the disk.
    """

    def __init__(self, root: str):
        self.root = root
        self._real: str | None = None  # realpath(root), taken when a link is first met
        self._ok = {""}  # directories (relative to root) checked

    def dir(self, rel: str) -> None:
        """Raises ``Violation`` unless the directory ``root/rel`` lies inside ``root``."""
        if rel in self._ok:
            return
        head = rel.rpartition("/")[0]
        if head not in self._ok:
            self.dir(head)
        self._entry(rel)
        self._ok.add(rel)

    def file(self, rel: str) -> None:
        """Raises ``Violation`` unless the file ``root/rel`` lies inside ``root``."""
        self.dir(rel.rpartition("/")[0])
        self._entry(rel)

    def tree(self, rel: str) -> None:
        """Raises ``Violation`` unless everything under ``root/rel`` lies inside ``root``: what
        a reader that follows links (TensorStore's file driver) may open there."""
        self.dir(rel)
        stack = [os.path.join(self.root, rel)]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                if e.is_symlink():
                    self._link(e.path)
                elif e.is_dir(follow_symlinks=False):
                    stack.append(e.path)

    def _entry(self, rel: str) -> None:
        p = os.path.join(self.root, rel)
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there: the read reports it missing, having opened nothing outside
        if stat.S_ISLNK(st.st_mode):
            self._link(p)

    def _link(self, p: str) -> None:
        real = os.path.realpath(p)
        if self._real is None:
            self._real = os.path.realpath(self.root)
        if real != self._real and not real.startswith(self._real.rstrip("/") + "/"):
            raise Violation(
                f"is stored under {p}, a symbolic link that leads outside the checkpoint "
                f"(to {real})"
            )


class Unconfined:
    """:class:`Confined` for a store without links (an object store): a key names one object,
    and the syntax checks (:func:`path_problem`) are all there is to enforce."""

    def dir(self, rel: str) -> None:
        pass

    def file(self, rel: str) -> None:
        pass

    def tree(self, rel: str) -> None:
        pass


def read_json(path: str, check: Callable[[bytes | None], None] | None = None) -> Any:
    """The JSON file at ``path`` (an array's ``zarr.json``), not followed if a link; raises
    ``Violation`` when it is missing, a link, or not JSON. ``check(data)`` (the checksum the
    checkpoint's ``COMMIT`` holds) sees the bytes before they are parsed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        if check is not None:
            check(None)  # what COMMIT says of a missing file
        raise Violation(f"has no array metadata: {path} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Violation(f"has its array metadata {path} as a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    if check is not None:
        check(data)
    try:
        return json.loads(data)
    except ValueError as e:
        raise Violation(f"has array metadata that is not valid JSON ({path}: {e})") from None


def ts_mismatch(e: Exception) -> Exception:
    """TensorStore's refusal of an array whose zarr.json disagrees with its record, as a
    ``Violation``; any other error as it is."""
    msg = str(e)
    if "FAILED_PRECONDITION" not in msg:
        return e
    m = re.search(r'Expected "(\w+)" of (.*?) but received: (.*?)(?: \[tensorstore_spec|$)', msg)
    if m is not None:
        what, want, got = m.groups()
        return Violation(
            f"is recorded with the {what} {_plain(want)}, but its array's zarr.json says "
            f"{_plain(got)}"
        )
    m = re.search(r'Mismatch in "(\w+)"', msg)
    if m is None:
        return e
    return Violation(f"has {m.group(1)} in its array's zarr.json other than its record's")


def _plain(v: str) -> str:
    """A value as TensorStore quotes it (``"\\"float32\\""``), unquoted once."""
    try:
        return v if not v.startswith('"') else str(json.loads(v))
    except ValueError:
        return v
