"""``jaxckpt inspect CKPT [PREFIX]``: a checkpoint's leaves (path, shape, dtype, size)."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from jaxckpt.tools import cli_json as _cli_json
from jaxckpt.tools import scan as _scan
from jaxckpt.tools import text as _text
from jaxckpt.tools.locate import UsageError, open_one
from jaxckpt.tools.scan import human_bytes


def add_parser(sub: Any) -> None:
    s = sub.add_parser("inspect", help="list a checkpoint's variables: path, shape, dtype, size")
    s.add_argument("ckpt", metavar="CKPT")
    s.add_argument("prefix", metavar="PREFIX", nargs="?", help="only the leaves under this path")
    _cli_json.add_flag(s)
    s.set_defaults(fn=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    reader = open_one(args.ckpt)
    prefix = (args.prefix or "").strip("/")
    variables = [
        v
        for v in reader.variables()
        if not prefix or v[0] == prefix or v[0].startswith(prefix + "/")
    ]
    if prefix and not variables:
        raise UsageError(
            f"No leaf of {reader.path} is under {prefix!r}. Fix: run `jaxckpt inspect {args.ckpt}` to see every path."
        )
    if args.json:
        _cli_json.write(_cli_json.inspect(reader, variables), out)
        return 0
    rows, total = [], 0
    for path, shape, dtype in variables:
        nbytes = _scan.nbytes(reader.records[path])
        total += nbytes or 0
        rows.append(
            (
                path or "<root>",
                _text.shape(shape),
                dtype,
                human_bytes(nbytes) if nbytes is not None else "-",
            )
        )
    print(_text.describe(reader), file=out)
    print(_text.table(("PATH", "SHAPE", "DTYPE", "SIZE"), rows, right=(3,)), file=out)
    print(f"{len(rows)} leaves, {human_bytes(total)} of array data", file=out)
    return 0
