"""``jaxckpt convert SRC DST``: the command line of :func:`jaxckpt.convert`, with progress on
a terminal."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from jaxckpt import progress as _progress
from jaxckpt.interop import convert as _convert


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "convert",
        help="safetensors, Flax msgpack or Orbax -> jaxckpt; jaxckpt -> Flax msgpack (DST "
        "ending in .msgpack) or safetensors (DST ending in .safetensors)",
    )
    s.add_argument("src", metavar="SRC")
    s.add_argument("dst", metavar="DST")
    s.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="safetensors DST: shards of at most SIZE (e.g. 5GB) with an index, as Hugging "
        "Face writes them",
    )
    s.add_argument(
        "--whole-names",
        action="store_true",
        help="safetensors SRC: keep tensor names whole instead of splitting them on '.'",
    )
    s.add_argument(
        "-q", "--quiet", action="store_true", help="no progress on stderr (shown on a terminal)"
    )
    s.set_defaults(fn=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    # The progress of writing a jaxckpt checkpoint, on a terminal only: piped or logged
    # output stays as it was.
    shown = not args.quiet and sys.stderr.isatty()
    with _progress.shown_on(sys.stderr if shown else None):
        print(
            _convert.convert_summary(args.src, args.dst, args.max_shard_size, not args.whole_names),
            file=out,
        )
    return 0
