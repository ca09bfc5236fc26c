"""Where a target leaf is looked for in a checkpoint: ``prefix`` (the checkpoint subtree
restored as the target's root) and ``rename`` (target paths mapped to checkpoint paths)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxckpt.format import paths as _paths

Rename = Mapping[str, str] | Callable[[str], str | None] | None
Prefix = str | tuple[str | int, ...] | None  # a checkpoint path, or its keys in turn


def _renamer(prefix: Prefix, rename: Rename) -> Callable[[str], str | None]:
    base = _prefix_of(prefix)
    if rename is None:
        fn: Callable[[str], str | None] = lambda p: p  # noqa: E731
    elif callable(rename):
        fn = rename
    else:
        rules = _rename_rules(rename)

        def fn(p: str) -> str | None:
            for pattern, repl in rules:
                p = pattern.sub(repl, p)
            return p

    def mapped(p: str) -> str | None:
        q = fn(p)
        if q is None:
            return None
        return f"{base}/{q}" if base and q else (base or q)

    return mapped


def _prefix_of(prefix: Any) -> str:
    """``prefix`` as a checkpoint path without empty segments ("" for None). A tuple of keys
    names the edges in turn: a str a dict key or attribute, an int a list/tuple index."""
    if isinstance(prefix, tuple) and all(
        isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool)) for k in prefix
    ):
        return "/".join(_paths.escape(k) if isinstance(k, str) else str(k) for k in prefix)
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(
            f"prefix must be a path in the checkpoint, as a str such as 'params/backbone' or a "
            f"tuple of keys such as ('params', 'backbone'), or None, not {prefix!r} "
            f"({type(prefix).__name__}). Fix: pass the path as a str or a tuple of keys."
        )
    return "/".join(p for p in (prefix or "").split("/") if p)


def _rename_rules(rename: Any) -> list[tuple[re.Pattern[str], str]]:
    """The compiled rules of a ``rename`` dict; any other ``rename`` is a TypeError."""
    if not isinstance(rename, Mapping):
        raise TypeError(
            f"rename must be a dict of regex -> replacement, a callable mapping a target path "
            f"to a checkpoint path (or None), or None; not {rename!r} "
            f"({type(rename).__name__}). Fix: e.g. rename={{'^encoder/': 'backbone/'}}."
        )
    rules = []
    for k, v in rename.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"rename maps regex patterns (str) to replacements (str), but it holds "
                f"{k!r}: {v!r}. Fix: write both as str, e.g. {{'^encoder/': 'backbone/'}}."
            )
        try:
            rules.append((re.compile(k), v))
        except re.error as e:
            raise ValueError(
                f"rename's pattern {k!r} is not a valid regular expression ({e}). Fix: correct "
                "it (re.escape(...) matches a path literally)."
            ) from None
    return rules
