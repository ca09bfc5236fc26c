"""The command line: ``jaxckpt ls | inspect | diff | verify | graph | convert``.

Exit status: 0 when all is well (``diff``: no differences), 1 when ``diff`` finds differences
or ``verify`` finds damage, 2 for a usage error (a bad argument or path), with the fix on stderr.
``ls``, ``inspect``, ``diff`` and ``verify`` take ``--json`` (see :mod:`jaxckpt.tools.cli_json`).
Each command is a module of its own (``ls``, ``inspect``, ``diff``, ``verify``, ``draw`` for
``graph``, ``convert``) with ``add_parser(sub)`` and ``run(args, out)``; this one parses the
arguments and runs the command.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from jaxckpt import __version__
from jaxckpt.errors import CheckpointError
from jaxckpt.tools import convert, diff, draw, inspect, ls, verify
from jaxckpt.tools.locate import UsageError
from jaxckpt.tools.scan import human_bytes as human_bytes

_COMMANDS = (ls, inspect, diff, verify, draw, convert)  # in the order `jaxckpt -h` lists them


@functools.cache  # built once: argparse looks up every help message's translation
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxckpt",
        description="Inspect, compare, verify, draw and convert jaxckpt checkpoints.",
        epilog="Exit status: 0 when all is well, 1 when diff finds differences or verify finds "
        "damage, 2 for a bad argument or path. `jaxckpt COMMAND -h` describes a command.",
    )
    p.add_argument("--version", action="version", version=f"jaxckpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Runs the command line; returns the exit status.

    Example:
        >>> main(["inspect", "/tmp/run/ckpt-10"])  # doctest: +SKIP
    """
    out = out or sys.stdout
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        code = int(args.fn(args, out))
        out.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # output piped into `head`, which has read enough: stop quietly
        # Python flushes stdout again at exit: give that flush somewhere to go.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UsageError, CheckpointError, OSError, ValueError) as e:
        print(f"jaxckpt {args.command}: error: {e}", file=sys.stderr)
        return 2
