"""``jaxckpt graph CKPT -o OUT.svg``: checks where the picture goes, then writes the SVG that
:func:`jaxckpt.tools.graph.render` draws."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from jaxckpt.tools import graph as _graph
from jaxckpt.tools.locate import UsageError, open_one


def add_parser(sub: Any) -> None:
    s = sub.add_parser("graph", help="draw the tree of named edges as an SVG picture")
    s.add_argument("ckpt", metavar="CKPT")
    s.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.svg",
        help="where to write the SVG ('-': stdout)",
    )
    s.add_argument("--prefix", help="draw only the subtree at this path (e.g. params)")
    s.add_argument("--max-depth", type=int, help="fold subtrees deeper than this into one box")
    s.set_defaults(fn=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    target = args.output
    if target != "-":
        if not target.endswith(".svg"):
            raise UsageError(
                f"graph writes SVG, but {target!r} does not end in .svg. Fix: `-o {os.path.splitext(target)[0]}.svg` "
                "(for a PNG, convert it afterwards, e.g. `rsvg-convert out.svg -o out.png`)."
            )
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise UsageError(
                f"Cannot write {target}: the directory {parent} does not exist. Fix: create it first."
            )
    reader = open_one(args.ckpt)
    svg, boxes, n = _graph.render(reader, prefix=args.prefix, max_depth=args.max_depth)
    if boxes > 4000:
        print(
            f"note: drawing {boxes} boxes; --max-depth or --prefix draws a smaller picture.",
            file=sys.stderr,
        )
    if target == "-":
        out.write(svg)
    else:
        with open(target, "w", encoding="utf-8") as f:
            f.write(svg)
        print(f"Wrote {target}: {n} leaves of {reader.path}", file=out)
    return 0
