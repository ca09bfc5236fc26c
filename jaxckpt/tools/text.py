"""The command line's plain-text output: tables, shapes, times, metrics and a checkpoint's
one-line description."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from jaxckpt.checkpoint.reader import Reader
from jaxckpt.interop import foreign


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def describe(reader: Reader) -> str:
    meta = reader.metadata
    parts = [reader.path]
    if meta.get("format"):  # a foreign checkpoint
        parts.append(f"({foreign.NAMES.get(meta['format'], meta['format'])})")
    if meta.get("step") is not None:
        parts.append(f"step {meta['step']}")
    if meta.get("time"):
        parts.append(f"saved {when(meta['time'])}")
    if meta.get("metrics"):
        parts.append(metrics(meta["metrics"]))
    return "  ".join(parts)
