"""The command line: ``jaxckpt ls | inspect | diff | verify | graph | convert``.

Exit status: 0 when all is well (``diff``: no differences), 1 when ``diff`` finds differences
or ``verify`` finds damage, 2 for a usage error (a bad argument or path), with the fix on stderr.
``ls``, ``inspect``, ``diff`` and ``verify`` take ``--json`` (see :mod:`jaxckpt.tools.cli_json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from jaxckpt import __version__
from jaxckpt import progress as _progress
from jaxckpt import storage as _storage
from jaxckpt.checkpoint.reader import Reader
from jaxckpt.checkpoint.reader import open as open_checkpoint
from jaxckpt.errors import CheckpointError, CorruptCheckpointError
from jaxckpt.format import run as _run
from jaxckpt.interop import convert as _convert
from jaxckpt.interop import foreign
from jaxckpt.local_tier import tier as _local_tier
from jaxckpt.tools import cli_json as _cli_json
from jaxckpt.tools import graph as _graph
from jaxckpt.tools import scan as _scan
from jaxckpt.tools.scan import human_bytes


class UsageError(Exception):
    """A bad argument or path; the message says what to do instead."""


# ---------------------------------------------------------------------------- formatting


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _describe(reader: Reader) -> str:
    meta = reader.metadata
    parts = [reader.path]
    if meta.get("format"):  # a foreign checkpoint
        parts.append(f"({foreign.NAMES.get(meta['format'], meta['format'])})")
    if meta.get("step") is not None:
        parts.append(f"step {meta['step']}")
    if meta.get("time"):
        parts.append(f"saved {_when(meta['time'])}")
    if meta.get("metrics"):
        parts.append(_metrics(meta["metrics"]))
    return "  ".join(parts)


def _open(path: str) -> Reader:
    """``jc.open``, with a hint when ``path`` is a manager's directory rather than one checkpoint."""
    try:
        return open_checkpoint(path)
    except FileNotFoundError:
        found = (
            _committed(path)
            if os.path.isdir(path) and not os.path.exists(os.path.join(path, "zarr.json"))
            else []
        )
        if not found:
            raise
        newest = os.path.join(path, found[-1][1])
        raise UsageError(
            f"{os.path.abspath(path)} is a directory of {len(found)} checkpoints, not one checkpoint. "
            f"Fix: name one of them, e.g. {newest} (the newest); `jaxckpt ls {path}` lists them."
        ) from None


# ---------------------------------------------------------------------------- ls


@dataclasses.dataclass
class _Usage:
    """A checkpoint's bytes on disk: all of them, those in files it shares with other
    checkpoints (hard links: incremental saves), and those only it holds."""

    size: int = 0
    shared: int = 0
    own: int = 0
    inodes: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)


def _disk_usage(path: str) -> _Usage:
    where = _storage.at(path).os_path()
    if where is None:  # the store has no files (an object store): count the array bytes
        reader = open_checkpoint(path)
        size = sum(_scan.nbytes(rec) or 0 for rec in reader.records.values())
        return _Usage(size, 0, size)
    use = _Usage()
    for root, _, files in os.walk(where):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            use.size += st.st_size
            if st.st_nlink > 1:
                use.shared += st.st_size
            else:
                use.own += st.st_size
            use.inodes[(st.st_dev, st.st_ino)] = st.st_size
    return use


def _committed(directory: str) -> list[tuple[int, str]]:
    """``(step or -1, name)`` of the committed checkpoints in ``directory``, by step (a
    checkpoint whose name is no step's, saved there by ``jc.save``, has -1)."""
    out = []
    store = _storage.at(directory)
    for name in store.names():
        if store.child(name).is_committed():
            step = _run.step_of(name)
            out.append((-1 if step is None else step, name))
    prefix = _storage.join(directory, "")
    out += [(step, path[len(prefix) :]) for step, path in foreign.run_steps(directory).items()]
    return sorted(out)


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    directory = _storage.normalize(args.dir)
    store = _storage.at(directory)
    if not store.is_dir():
        raise UsageError(
            f"No directory {directory}. Fix: give the directory a CheckpointManager writes to."
        )
    if store.is_committed():
        raise UsageError(
            f"{directory} is one checkpoint, not a manager's directory. Fix: `jaxckpt inspect "
            f"{args.dir}` lists its variables; `jaxckpt ls {os.path.dirname(directory)}` lists its siblings."
        )
    local = None if args.json else _local_tier.describe(directory)
    if local is not None:
        return _ls_local(directory, *local, out)
    index = _run.read_index(directory).entries
    rows = []
    kinds: dict[str, str] = {}
    for step, name in _committed(directory):
        path = _storage.join(directory, name)
        try:
            meta = open_checkpoint(path).metadata
        except CheckpointError as e:
            meta = {"error": f"unreadable: {str(e).split('. ')[0]}"}
        step = meta.get("step", step)
        extra = index.get(step)
        when = meta.get("time") or (extra.time if extra else None)
        metrics = meta.get("metrics") or (extra.metrics if extra else None)
        if meta.get("format"):  # another library's step, shown as such
            kinds[name] = foreign.NAMES.get(meta["format"], meta["format"])
        rows.append((step, name, _disk_usage(path), when, metrics, meta.get("error")))
    unfinished = [
        n
        for n in store.names()
        if _storage.is_debris(n)
        or (_run.step_of(n) is not None and not store.child(n).is_committed())
    ]
    if args.json:
        rows.sort(key=lambda r: (r[0], r[1]))
        rows_ = [(s, n, _storage.join(directory, n), use, t, m, e) for s, n, use, t, m, e in rows]
        _cli_json.write(_cli_json.ls(directory, rows_, unfinished), out)
        return 0
    if not rows:
        print(f"No committed checkpoints in {directory}.", file=out)
    else:
        rows.sort(key=lambda r: (r[0], r[1]))
        table = [
            (
                str(s) if s >= 0 else "-",
                f"{n} ({kinds[n]})" if n in kinds else n,
                human_bytes(u.size),
                human_bytes(u.shared),
                human_bytes(u.own),
                _when(t),
                err or _metrics(mt),
            )
            for s, n, u, t, mt, err in rows
        ]
        heads = ("STEP", "NAME", "SIZE", "SHARED", "OWN", "SAVED", "METRICS")
        print(_table(heads, table, right=(0, 2, 3, 4)), file=out)
        # A file hard-linked into several checkpoints is counted once, as du counts it.
        inodes = {k: v for _, _, u, _, _, _ in rows for k, v in u.inodes.items()}
        total = sum(inodes.values()) if inodes else sum(r[2].size for r in rows)
        print(f"{len(rows)} checkpoints, {human_bytes(total)} on disk", file=out)
    if unfinished:
        print(f"{len(unfinished)} unfinished save(s) ignored: {', '.join(unfinished)}", file=out)
    return 0


def _ls_local(
    directory: str, mine: list[int], rows: list[tuple[int, list[int], list[int], int]], out: TextIO
) -> int:
    """A manager's local tier: the parts of each step this host holds, its own and its peers'."""
    who = ", ".join(map(str, mine))
    print(f"{directory}: the local tier of process {who}", file=out)
    if not rows:
        print("No local steps.", file=out)
        return 0
    table = [
        (str(s), ",".join(map(str, own)) or "-", ",".join(map(str, peers)) or "-", human_bytes(n))
        for s, own, peers, n in rows
    ]
    print(_table(("STEP", "OWN", "REPLICAS OF", "SIZE"), table, right=(0, 3)), file=out)
    return 0


# ---------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    reader = _open(args.ckpt)
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
                _shape(shape),
                dtype,
                human_bytes(nbytes) if nbytes is not None else "-",
            )
        )
    print(_describe(reader), file=out)
    print(_table(("PATH", "SHAPE", "DTYPE", "SIZE"), rows, right=(3,)), file=out)
    print(f"{len(rows)} leaves, {human_bytes(total)} of array data", file=out)
    return 0


# ---------------------------------------------------------------------------- diff


def cmd_diff(args: argparse.Namespace, out: TextIO) -> int:
    a, b = _open(args.a), _open(args.b)
    d = _scan.diff(a, b, atol=args.atol)
    if args.json:
        doc = _cli_json.diff(a, b, d)
        _cli_json.write(doc, out)
        return 0 if doc["same"] else 1
    print(f"--- A: {_describe(a)}\n+++ B: {_describe(b)}", file=out)
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
        return f"{_shape(rec['shape'])} {rec['dtype']}"
    if rec["t"] == "state":
        return "state"
    value = repr(reader.read(path))
    return f"{rec['py']} {value if len(value) <= 40 else value[:37] + '...'}"


# ---------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    progress = _scan.Progress(sys.stderr, quiet=args.quiet)
    try:
        reader = _open(args.ckpt)
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


# ---------------------------------------------------------------------------- graph, convert


def cmd_graph(args: argparse.Namespace, out: TextIO) -> int:
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
    reader = _open(args.ckpt)
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


def cmd_convert(args: argparse.Namespace, out: TextIO) -> int:
    # The progress of writing a jaxckpt checkpoint, on a terminal only: piped or logged
    # output stays as it was.
    shown = not args.quiet and sys.stderr.isatty()
    was = dict(_progress._settings)
    if shown:
        _progress.set_progress(True, stream=sys.stderr)
    try:
        print(
            _convert.convert_summary(args.src, args.dst, args.max_shard_size, not args.whole_names),
            file=out,
        )
    finally:
        _progress._settings.update(was)
    return 0


# ---------------------------------------------------------------------------- main


def _json_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--json", action="store_true", help="print one JSON object (see docs/cli.md)")


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
    s = sub.add_parser("ls", help="list a manager's checkpoints: steps, sizes, times, metrics")
    s.add_argument("dir", metavar="DIR")
    _json_flag(s)
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("inspect", help="list a checkpoint's variables: path, shape, dtype, size")
    s.add_argument("ckpt", metavar="CKPT")
    s.add_argument("prefix", metavar="PREFIX", nargs="?", help="only the leaves under this path")
    _json_flag(s)
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser(
        "diff", help="compare two checkpoints leaf by leaf (exit 1 when they differ)"
    )
    s.add_argument("a", metavar="A")
    s.add_argument("b", metavar="B")
    s.add_argument(
        "--atol", type=float, default=0.0, help="ignore value differences up to this (default 0)"
    )
    _json_flag(s)
    s.set_defaults(fn=cmd_diff)
    s = sub.add_parser("verify", help="read every chunk, checking its crc32c (exit 1 on damage)")
    s.add_argument("ckpt", metavar="CKPT")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _json_flag(s)
    s.set_defaults(fn=cmd_verify)
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
    s.set_defaults(fn=cmd_graph)
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
    s.set_defaults(fn=cmd_convert)
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
