"""What a reader checks before it trusts a checkpoint's metadata.

Checkpoints are downloaded from strangers (a model hub, a colleague's bucket) and opened by jobs
that can read everything else on the host, so nothing a checkpoint's metadata says is used
before it is checked: every path it names stays inside the checkpoint, syntactically first (no
I/O), then on a local disk through the links it meets. docs/format.md lists the rules ("What a
reader enforces"). A broken rule is a :class:`Violation`, which the reader turns into a
``CorruptCheckpointError`` naming the checkpoint and the leaf.
"""

from __future__ import annotations

import functools
import os
import stat
from typing import Any

from ._errors import CorruptCheckpointError


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


# ---------------------------------------------------------------------------- paths


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


# ---------------------------------------------------------------------------- records


def leaf_problem(rec: Any) -> str | None:
    """What is wrong with a leaf record, or None (its files are checked when read)."""
    if not isinstance(rec, dict):
        return f"has the record {_short(rec)}, which is not a JSON object"
    if rec.get("t") == "array":
        return path_problem(rec.get("loc"))
    return None
