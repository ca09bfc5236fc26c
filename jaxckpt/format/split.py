"""Split structure records: a big tree's record spread over the ``zarr.json`` of its groups.

When the root's record (see :mod:`jaxckpt.format.metadata`) would take more than ``SPLIT_BYTES`` of
JSON, each inner child whose own record takes at least ``SPLIT_CHILD_BYTES`` moves into that
child's group ``zarr.json``, as ``attributes["jaxckpt"] = {"tree": record}``; in the parent the
child becomes a stub: its node keys except ``"c"``, plus ``"split": true``. A moved record is
split the same way. Opening a checkpoint then parses a few KB, and :class:`Tree` reads a group
file only when a lookup passes through its stub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from jaxckpt import storage as _storage
from jaxckpt.errors import CorruptCheckpointError
from jaxckpt.format import metadata as _metadata
from jaxckpt.format import paths as _paths
from jaxckpt.format.metadata import Record
from jaxckpt.storage import confine as _confine

SPLIT_BYTES = 64 * 1024  # a record above this moves its big inner children out
SPLIT_CHILD_BYTES = 1024  # ... those whose own record takes at least this

Entry = list[Any]  # [kind, key, child record], an edge of a record's "c"


def _json_len(x: Any) -> int:
    return len(json.dumps(x, separators=(",", ":")))


def split(record: Record) -> tuple[Record, dict[str, Record]]:
    """The record kept in the root ``zarr.json``, and ``{group path: record}`` of the subtrees
    moved into their group's ``zarr.json``. A small record comes back as it is, moving none.

    Each level that is cut encodes its children once to size them (the JSON of every child
    subtree), so a tree split at one level costs about one extra encoding of its record.
    """
    moved: dict[str, Record] = {}

    def cut(n: Record, at: str, size: int | None = None) -> Record:
        if n["t"] in _metadata.LEAF_KINDS or (size is not None and size <= SPLIT_BYTES):
            return n
        sizes = [_json_len(child) for _, _, child in n["c"]]
        if size is None:  # n's own JSON: its keys, each edge's [kind, key, child] and commas
            head = _json_len({k: v for k, v in n.items() if k != "c"}) + len(',"c":[]')
            edges = sum(_json_len([kind, key]) + 2 for kind, key, _ in n["c"])
            size = head + edges + sum(sizes)
            if size <= SPLIT_BYTES:
                return n
        kids = []
        for (kind, key, child), child_size in zip(n["c"], sizes, strict=True):
            if child["t"] not in _metadata.LEAF_KINDS and child_size >= SPLIT_CHILD_BYTES:
                name = _paths.name_of(kind, key)
                sub = f"{at}/{name}" if at else name
                moved[sub] = cut(child, sub, child_size)
                child = {**{k: v for k, v in child.items() if k != "c"}, "split": True}
            kids.append([kind, key, child])
        return {**n, "c": kids}

    return cut(record, ""), moved


def group_attributes(record: Record) -> dict[str, Any]:
    """The attributes of the group ``zarr.json`` that keeps a moved subtree's record."""
    return {_metadata.ATTR_KEY: {"tree": record}}


class Tree:
    """A structure record whose split subtrees are read from their group files when needed.

    A stub is replaced in place by the record it stands for, so each file is read once.
    """

    def __init__(
        self,
        root: str,
        record: Record,
        early: dict[str, Future] | None = None,
        check: Callable[[str, bytes | None], None] | None = None,
    ):
        self.root = root  # the checkpoint's path
        self.record = record
        self._early = early or {}  # group file -> its bytes (or None), read ahead in parallel
        self._check = check  # check(file, bytes) raises when they are not what the save wrote
        self._kids: dict[str, dict[str, Entry]] = {}  # node path -> {edge name: entry}
        self._whole = False  # every stub read
        self._confined: Any = None  # group directories checked

    def entries(self, path: str) -> list[Entry] | None:
        """The edges from the root to the node at ``path`` (``"a/b"``; ``""`` is the root), or
        None if there is no such node. Reads only the group files of stubs on the way."""
        node, out, at = self.record, [], ""
        for name in path.split("/") if path else []:
            if node["t"] in _metadata.LEAF_KINDS:
                return None
            kids = self._kids.get(at)
            if kids is None:
                kids = self._kids[at] = {_paths.name_of(e[0], e[1]): e for e in node["c"]}
            e = kids.get(name)
            if e is None:
                return None
            at = f"{at}/{name}" if at else name
            out.append(e)
            if e[2].get("split"):
                self._load([(at, out[:], e)])
            node = e[2]
        return out

    def node(self, path: str) -> Record | None:
        """The record at ``path`` (its split children may still be stubs), or None."""
        es = self.entries(path)
        return None if es is None else (es[-1][2] if es else self.record)

    def whole(self, path: str = "") -> Record | None:
        """The record at ``path`` with every stub under it read, or None if no such node.

        The group files are read a level at a time, each level's files together.
        """
        if self._whole:
            return self.node(path)
        es = self.entries(path)
        if es is None:
            return None
        node = es[-1][2] if es else self.record
        pending = _stubs(node, path, es)
        while pending:
            self._load(pending)
            pending = [s for at, ents, e in pending for s in _stubs(e[2], at, ents)]
        self._whole = self._whole or not path
        return node

    def _load(self, stubs: list[tuple[str, list[Entry], Entry]]) -> None:
        """Reads the records of ``stubs`` (path, edges from the root, entry) into place."""
        files = [f"{at}/zarr.json" for at, _, _ in stubs]
        early = [self._early.pop(f, None) for f in files]
        self._confine(stubs, files)
        try:
            if all(f is not None and f.exception() is None and f.result() for f in early):
                datas = [f.result() for f in early]  # type: ignore[union-attr]
                if self._check is not None:
                    for name, data in zip(files, datas, strict=True):
                        self._check(name, data)
                docs = [
                    _storage.parse_json(_storage.join(self.root, name), data)
                    for name, data in zip(files, datas, strict=True)
                ]
            else:  # read (again): a file missing or unreadable is reported as such
                docs = _storage.at(self.root).read_jsons(files, self._check)
        except FileNotFoundError as e:
            named = [
                s
                for s, f in zip(stubs, files, strict=True)
                if _storage.join(self.root, f) == e.filename
            ]
            at, ents, _ = (named or stubs)[0]
            raise _damaged(self.root, at, ents, "is missing") from e
        for (at, ents, entry), doc in zip(stubs, docs, strict=True):
            attrs = doc.get("attributes") if isinstance(doc, dict) else None
            meta = attrs.get(_metadata.ATTR_KEY) if isinstance(attrs, dict) else None
            rec = meta.get("tree") if isinstance(meta, dict) else None
            if not isinstance(rec, dict) or rec.get("t") != entry[2]["t"] or "c" not in rec:
                raise _damaged(self.root, at, ents, "lacks that record")
            entry[2] = rec

    def _confine(self, stubs: list[tuple[str, list[Entry], Entry]], files: list[str]) -> None:
        """Raises ``CorruptCheckpointError`` unless every group file lies inside the checkpoint:
        its path, made of names from the metadata, first (before any I/O), then the links on a
        local disk."""
        for at, ents, _ in stubs:
            if _confine.path_problem(at) is not None:
                raise _damaged(self.root, at, ents, "would lie outside the checkpoint")
        if self._confined is None:
            self._confined = _storage.at(self.root).confined()
        for (at, ents, _), f in zip(stubs, files, strict=True):
            try:
                self._confined.file(f)
            except _confine.Violation:
                what = "is reached through a symbolic link that leads outside the checkpoint"
                raise _damaged(self.root, at, ents, what) from None


def _stubs(node: Record, at: str, ents: list[Entry]) -> list[tuple[str, list[Entry], Entry]]:
    """``(path, edges from the root, entry)`` of every stub under ``node``, not below stubs."""
    out: list[tuple[str, list[Entry], Entry]] = []
    if node["t"] in _metadata.LEAF_KINDS:
        return out
    for e in node["c"]:
        child = e[2]
        if child["t"] in _metadata.LEAF_KINDS:
            continue
        name = _paths.name_of(e[0], e[1])
        sub = f"{at}/{name}" if at else name
        if child.get("split"):
            out.append((sub, [*ents, e], e))
        else:
            out += _stubs(child, sub, [*ents, e])
    return out


def _damaged(root: str, at: str, ents: list[Entry], what: str) -> CorruptCheckpointError:
    try:
        where = _paths.keystr([_paths.key_of(e[0], e[1]) for e in ents])
    except (TypeError, ValueError):  # edges damaged too
        where = repr(at)
    return CorruptCheckpointError(
        f"{_storage.join(root, at)}/zarr.json {what}: it keeps the structure record of the "
        f"subtree at {where} (split out of the root zarr.json), so the checkpoint's metadata "
        "is damaged. Fix: restore an earlier checkpoint, or copy this checkpoint again in full."
    )
