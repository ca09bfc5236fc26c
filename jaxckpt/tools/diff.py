"""``jaxckpt diff A B``: two checkpoints compared leaf by leaf (exit status 1 when they
differ); the comparison itself is :func:`jaxckpt.tools.scan.diff`."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from jaxckpt.checkpoint.reader import Reader
from jaxckpt.tools import cli_json as _cli_json
from jaxckpt.tools import scan as _scan
from jaxckpt.tools import text as _text
from jaxckpt.tools.locate import open_one


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "diff", help="compare two checkpoints leaf by leaf (exit 1 when they differ)"
    )
    s.add_argument("a", metavar="A")
    s.add_argument("b", metavar="B")
    s.add_argument(
        "--atol", type=float, default=0.0, help="ignore value differences up to this (default 0)"
    )
    _cli_json.add_flag(s)
    s.set_defaults(fn=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    a, b = open_one(args.a), open_one(args.b)
    d = _scan.diff(a, b, atol=args.atol)
    if args.json:
        doc = _cli_json.diff(a, b, d)
        _cli_json.write(doc, out)
        return 0 if doc["same"] else 1
    print(f"--- A: {_text.describe(a)}\n+++ B: {_text.describe(b)}", file=out)
    for p in d.only_a:
        print(f"- {p}  {_leaf(a, p)}  only in A", file=out)
    for p in d.only_b:
        print(f"+ {p}  {_leaf(b, p)}  only in B", file=out)
    for p in d.changed:
        print(f"~ {p}  {_leaf(a, p)} -> {_leaf(b, p)}", file=out)
    for p, (n, size, maxdiff) in d.values.items():
        if maxdiff is None:
            print(f"! {p}  {_leaf(a, p)} -> {_leaf(b, p)}", file=out)
        else:
            print(
                f"! {p}  {_leaf(a, p)}  {n} of {size} values differ, max abs diff {maxdiff:.6g}",
                file=out,
            )
    n_diff = len(d.only_a) + len(d.only_b) + len(d.changed) + len(d.values)
    if not n_diff:
        print(f"A and B hold the same {d.equal} leaves with equal values.", file=out)
        return 0
    print(
        f"A and B differ: {len(d.only_a)} only in A, {len(d.only_b)} only in B, "
        f"{len(d.changed)} changed shape/dtype, {len(d.values)} differ in value; "
        f"{d.equal} leaves equal.",
        file=out,
    )
    return 1


def _leaf(reader: Reader, path: str) -> str:
    rec = reader.records[path]
    if rec["t"] == "array":
        return f"{_text.shape(rec['shape'])} {rec['dtype']}"
    if rec["t"] == "state":
        return "state"
    value = repr(reader.read(path))
    return f"{rec['py']} {value if len(value) <= 40 else value[:37] + '...'}"
