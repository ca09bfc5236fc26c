"""``jaxckpt verify CKPT``: every chunk read and its CRC-32C checked (exit status 1 on
damage), with how to restore the rest; the reading itself is :func:`jaxckpt.tools.scan.verify`
(``foreign.verify`` for another library's checkpoint)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from jaxckpt.checkpoint.reader import Reader
from jaxckpt.errors import CorruptCheckpointError
from jaxckpt.interop import foreign
from jaxckpt.tools import cli_json as _cli_json
from jaxckpt.tools import scan as _scan
from jaxckpt.tools.locate import open_one
from jaxckpt.tools.scan import human_bytes


def add_parser(sub: Any) -> None:
    s = sub.add_parser("verify", help="read every chunk, checking its crc32c (exit 1 on damage)")
    s.add_argument("ckpt", metavar="CKPT")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _cli_json.add_flag(s)
    s.set_defaults(fn=run)


def run(args: argparse.Namespace, out: TextIO) -> int:
    progress = _scan.Progress(sys.stderr, quiet=args.quiet)
    try:
        reader = open_one(args.ckpt)
        if isinstance(reader, foreign.ForeignReader):
            report = foreign.verify(reader, progress)
        else:
            report = _scan.verify(reader, progress)  # a record a reader refuses: damage too
    except CorruptCheckpointError as e:
        if args.json:
            _cli_json.write(_cli_json.verify(os.path.abspath(args.ckpt), None, str(e)), out)
            return 1
        print(f"DAMAGED {os.path.abspath(args.ckpt)}: {e}", file=out)
        return 1
    if args.json:
        _cli_json.write(_cli_json.verify(reader.path, report), out)
        return 1 if report.damaged or report.files else 0
    for problem in report.files:
        print(f"DAMAGED {problem}", file=out)
    for path, err in sorted(report.damaged.items()):
        print(f"DAMAGED {path or '<root>'}: {err}", file=out)
    if report.files:
        n = len(report.files)
        arrays = f" and {len(report.damaged)} of {report.arrays} arrays" if report.damaged else ""
        are = "are" if n > 1 or arrays else "is"
        print(
            f"{n} file{'s' if n > 1 else ''}{arrays} in {reader.path} {are} damaged. Fix: "
            "restore an earlier checkpoint (`jaxckpt ls` lists them).",
            file=out,
        )
        return 1
    if report.damaged:
        print(
            f"{len(report.damaged)} of {report.arrays} arrays in {reader.path} are damaged. Fix: "
            "restore an earlier checkpoint (`jaxckpt ls` lists them)"
            + _skip_advice(reader, report.damaged),
            file=out,
        )
        return 1
    checked = (
        foreign.VERIFIED.format(foreign.NAMES.get(reader.format, reader.format))
        if isinstance(reader, foreign.ForeignReader)
        else "every chunk's checksum verified"
    )
    print(
        f"OK: {reader.path}: {report.arrays} arrays, {human_bytes(report.nbytes)}, {checked}.",
        file=out,
    )
    return 0


def _skip_advice(reader: Reader, damaged: dict[str, str]) -> str:
    """How to restore the rest of a checkpoint, leaving the damaged leaves at the target's own
    values: they are renamed to no saved path (missing="keep" keeps the target's value) and
    so never read (partial=True)."""
    leaves = sorted(p for p in damaged if p in reader.records)
    if not leaves:
        return "."
    return (
        ", or restore this one with the damaged leaves left at the target's own values:\n"
        f"  damaged = {{{', '.join(map(repr, leaves))}}}\n"
        f'  jc.restore({reader.path!r}, target, partial=True, missing="keep", '
        "rename=lambda p: None if p in damaged else p)"
    )
