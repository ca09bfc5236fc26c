"""Key paths <-> escaped edge names.

Every edge of a pytree (a ``jax.tree_util`` key) becomes one directory name on disk. The
name alone is unique among its siblings and decodes back to the key; the edge's *kind*
(dict key, sequence index, attribute, flattened index) is recorded in the metadata too.

Rules, so that any key round-trips and nothing escapes the checkpoint directory:

- ``%``, ``/``, ``\\``, ``:``, control characters and lone surrogates are percent-encoded
  (``%2F``...), as the UTF-8 bytes of the character.
- A name that would be empty is ``%``. A name made only of periods (``.``, ``..``, ...),
  starting with ``__`` (reserved by zarr v3) or ``~``, or equal to a file name jaxckpt
  itself writes inside a group (``zarr.json``, ``COMMIT``, compared case-insensitively)
  gets its first character encoded (``%2E``, ``%5F_x``, ``%7Ai0``, ``%7Aarr.json``).
- Integer dict keys are ``~i<int>``, so ``{0: x}`` and ``{"0": x}`` never collide.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import jax

from jaxckpt.errors import UnsupportedLeafError

# Edge kinds, as recorded in the metadata.
DICT, INT_DICT, SEQ, ATTR, FLAT = "d", "i", "s", "a", "f"

_UNSAFE = re.compile(r"[%/\\:\x00-\x1f\x7f\ud800-\udfff]")
_ESCAPE = re.compile(r"%([0-9A-F]{2})")
_RESERVED = ("zarr.json", "commit")  # files jaxckpt writes beside a group's children


def _quote_char(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))


@functools.lru_cache(maxsize=1 << 16)  # a tree's keys repeat across saves and restores
def escape(s: str) -> str:
    """Escapes a string key into a safe, reversible file name."""
    if s == "":
        return "%"
    out = _UNSAFE.sub(lambda m: _quote_char(m.group()), s)
    if set(out) == {"."} or out.startswith(("__", "~")) or out.lower() in _RESERVED:
        out = _quote_char(out[0]) + out[1:]
    return out


def unescape(name: str) -> str:
    """Decodes a name written by :func:`escape` back to its string key."""
    if name == "%":
        return ""
    raw = _ESCAPE.sub(lambda m: "\x00" + m.group(1), name)
    if "\x00" not in raw:
        return name
    # Decode runs of %XX as UTF-8 bytes.
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == "\x00":
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out += raw[i].encode("utf-8")
            i += 1
    return out.decode("utf-8", "surrogatepass")


def edge_of(key: Any, where: str = "") -> tuple[str, Any]:
    """Returns ``(kind, key)`` for one ``jax.tree_util`` key entry."""
    tu = jax.tree_util
    if isinstance(key, tu.DictKey):
        k = key.key
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise UnsupportedLeafError(
                f"The dict at {where or '<root>'} has the key {k!r}, a {type(k).__name__}; "
                "jaxckpt expects dict keys that are str or int. Fix: convert the keys, e.g. "
                "{str(k): v for k, v in d.items()}."
            )
        return (DICT, k) if isinstance(k, str) else (INT_DICT, k)
    if isinstance(key, tu.SequenceKey):
        return SEQ, key.idx
    if isinstance(key, tu.GetAttrKey):
        return ATTR, key.name
    if isinstance(key, tu.FlattenedIndexKey):
        return FLAT, key.key
    raise UnsupportedLeafError(
        f"The pytree node at {where or '<root>'} names a child with a {type(key).__name__} key "
        f"({key!r}); jaxckpt expects DictKey, SequenceKey, GetAttrKey or FlattenedIndexKey. "
        "Fix: register the class with jax.tree_util.register_dataclass, or with "
        "register_pytree_with_keys using one of those key types."
    )


def name_of(kind: str, key: Any) -> str:
    """The on-disk name of one edge."""
    if kind in (DICT, ATTR):
        return escape(key)
    if kind == INT_DICT:
        return f"~i{key}"
    return str(key)


def key_of(kind: str, key: Any) -> Any:
    """The ``jax.tree_util`` key entry of one recorded edge."""
    tu = jax.tree_util
    if kind in (DICT, INT_DICT):
        return tu.DictKey(key)
    if kind == SEQ:
        return tu.SequenceKey(key)
    if kind == ATTR:
        return tu.GetAttrKey(key)
    return tu.FlattenedIndexKey(key)


def path_str(keypath: Sequence[Any]) -> str:
    """``jax.tree_util`` key path -> ``"params/l1/kernel"`` (the name jaxckpt shows)."""
    return "/".join(name_of(*edge_of(k)) for k in keypath)


def keystr(keypath: Sequence[Any]) -> str:
    """The path as users see it in errors (``jax.tree_util.keystr`` form)."""
    return jax.tree_util.keystr(tuple(keypath)) if keypath else "<root>"
