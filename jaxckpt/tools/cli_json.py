"""The command line's ``--json`` documents (their schema is in docs/cli.md).

Each command prints one JSON object; the keys below are the stable interface, and new keys may
be added. Times are Unix seconds, sizes are bytes, shapes are lists of ints.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, TextIO

from jaxckpt.checkpoint.reader import Reader
from jaxckpt.format.metadata import Record
from jaxckpt.tools import scan as _scan

SCHEMA = 1  # bumped only when a key changes meaning or goes away


def add_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--json`` option of a command that prints one of these documents."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (see docs/cli.md)"
    )


def write(doc: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps({"schema": SCHEMA, **doc}, indent=2, allow_nan=False) + "\n")


def _number(x: float | None) -> float | str | None:
    """JSON has no NaN or infinity: those are written as the strings "nan", "inf", "-inf"."""
    if x is None or math.isfinite(x):
        return x
    return str(x)


def checkpoint(reader: Reader) -> dict[str, Any]:
    meta = reader.metadata
    return {
        "path": reader.path,
        "step": meta.get("step"),
        "time": meta.get("time"),
        "metrics": meta.get("metrics"),
    }


def ls(
    directory: str,
    rows: list[tuple[int, str, str, Any, float | None, Any, str | None]],
    unfinished: list[str],
) -> dict[str, Any]:
    """``rows``: (step or -1, name, path, disk usage, time, metrics, error) per committed
    checkpoint (the usage's ``size``, ``shared`` and ``own`` bytes)."""
    return {
        "command": "ls",
        "directory": directory,
        "checkpoints": [
            {
                "step": step if step >= 0 else None,
                "name": name,
                "path": path,
                "bytes": use.size,
                "shared_bytes": use.shared,
                "own_bytes": use.own,
                "time": when,
                "metrics": metrics,
                "error": err,
            }
            for step, name, path, use, when, metrics, err in rows
        ],
        "unfinished": unfinished,
    }


def _kind(rec: Record) -> str:
    return rec["t"] if rec["t"] in ("array", "state") else "value"


def inspect(reader: Reader, variables: list[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    leaves = [
        {
            "path": path,
            "kind": _kind(reader.records[path]),
            "shape": list(shape),
            "dtype": dtype,
            "bytes": _scan.nbytes(reader.records[path]),
        }
        for path, shape, dtype in variables
    ]
    return {
        "command": "inspect",
        "checkpoint": checkpoint(reader),
        "leaves": leaves,
        "bytes": sum(leaf["bytes"] or 0 for leaf in leaves),
    }


def _leaf(reader: Reader, path: str) -> dict[str, Any]:
    rec = reader.records[path]
    if rec["t"] == "array":
        return {"kind": "array", "shape": list(rec["shape"]), "dtype": rec["dtype"]}
    if rec["t"] == "state":
        return {"kind": "state"}
    return {"kind": "value", "type": rec["py"], "value": repr(reader.read(path))}


def diff(a: Reader, b: Reader, d: _scan.Diff) -> dict[str, Any]:
    values: list[dict[str, Any]] = []
    for p, (n, size, maxdiff) in d.values.items():
        if maxdiff is None:  # a Python value
            values.append({"path": p, "a": _leaf(a, p), "b": _leaf(b, p)})
        else:
            values.append({"path": p, "differ": n, "size": size, "max_abs_diff": _number(maxdiff)})
    return {
        "command": "diff",
        "a": checkpoint(a),
        "b": checkpoint(b),
        "same": not (d.only_a or d.only_b or d.changed or d.values),
        "only_a": [{"path": p, **_leaf(a, p)} for p in d.only_a],
        "only_b": [{"path": p, **_leaf(b, p)} for p in d.only_b],
        "changed": [{"path": p, "a": _leaf(a, p), "b": _leaf(b, p)} for p in d.changed],
        "values": values,
        "equal": d.equal,
    }


def verify(
    path: str, report: _scan.VerifyReport | None, error: str | None = None
) -> dict[str, Any]:
    """``report`` None: the checkpoint's metadata itself is damaged (``error`` says how)."""
    damaged = [{"path": None, "error": error}] if report is None else []
    if report is not None:  # damaged metadata files first (no leaf path), then arrays
        damaged = [{"path": None, "error": f} for f in report.files]
        damaged += [{"path": p, "error": e} for p, e in sorted(report.damaged.items())]
    return {
        "command": "verify",
        "path": path,
        "ok": not damaged,
        "arrays": report.arrays if report else None,
        "bytes": report.nbytes if report else None,
        "damaged": damaged,
    }
