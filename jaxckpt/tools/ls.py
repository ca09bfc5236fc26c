"""``jaxckpt ls DIR``: a manager's checkpoints (step, name, bytes on disk, shared and own,
time, metrics), or the parts of each step a local tier holds."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TextIO

from jaxckpt import storage as _storage
from jaxckpt.checkpoint.reader import open as open_checkpoint
from jaxckpt.errors import CheckpointError
from jaxckpt.format import run as _run
from jaxckpt.interop import foreign
from jaxckpt.local_tier import tier as _local_tier
from jaxckpt.tools import cli_json as _cli_json
from jaxckpt.tools import scan as _scan
from jaxckpt.tools import text as _text
from jaxckpt.tools.locate import UsageError, committed
from jaxckpt.tools.scan import human_bytes


def add_parser(sub: Any) -> None:
    s = sub.add_parser("ls", help="list a manager's checkpoints: steps, sizes, times, metrics")
    s.add_argument("dir", metavar="DIR")
    _cli_json.add_flag(s)
    s.set_defaults(fn=run)


@dataclasses.dataclass
class Usage:
    """A checkpoint's bytes on disk: all of them, those in files it shares with other
    checkpoints (hard links: incremental saves), and those only it holds."""

    size: int = 0
    shared: int = 0
    own: int = 0
    inodes: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)


def disk_usage(path: str) -> Usage:
    where = _storage.at(path).os_path()
    if where is None:  # the store has no files (an object store): count the array bytes
        reader = open_checkpoint(path)
        size = sum(_scan.nbytes(rec) or 0 for rec in reader.records.values())
        return Usage(size, 0, size)
    use = Usage()
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


# (step or -1, name, disk usage, time, metrics, error) of one committed checkpoint
_Row = tuple[int, str, Usage, Any, Any, Any]


def run(args: argparse.Namespace, out: TextIO) -> int:
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
    rows, kinds = _rows(directory)
    unfinished = [
        n
        for n in store.names()
        if _storage.is_debris(n)
        or (_run.step_of(n) is not None and not store.child(n).is_committed())
    ]
    rows.sort(key=lambda r: (r[0], r[1]))
    if args.json:
        rows_ = [(s, n, _storage.join(directory, n), use, t, m, e) for s, n, use, t, m, e in rows]
        _cli_json.write(_cli_json.ls(directory, rows_, unfinished), out)
        return 0
    if not rows:
        print(f"No committed checkpoints in {directory}.", file=out)
    else:
        _print_rows(rows, kinds, out)
    if unfinished:
        print(f"{len(unfinished)} unfinished save(s) ignored: {', '.join(unfinished)}", file=out)
    return 0


def _rows(directory: str) -> tuple[list[_Row], dict[str, str]]:
    """A row for each committed checkpoint in ``directory`` (its time and metrics from the
    run's index where its own metadata has none), and the format of each foreign one."""
    index = _run.read_index(directory).entries
    rows: list[_Row] = []
    kinds: dict[str, str] = {}
    for step, name in committed(directory):
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
        rows.append((step, name, disk_usage(path), when, metrics, meta.get("error")))
    return rows, kinds


def _print_rows(rows: list[_Row], kinds: dict[str, str], out: TextIO) -> None:
    table = [
        (
            str(s) if s >= 0 else "-",
            f"{n} ({kinds[n]})" if n in kinds else n,
            human_bytes(u.size),
            human_bytes(u.shared),
            human_bytes(u.own),
            _text.when(t),
            err or _text.metrics(mt),
        )
        for s, n, u, t, mt, err in rows
    ]
    heads = ("STEP", "NAME", "SIZE", "SHARED", "OWN", "SAVED", "METRICS")
    print(_text.table(heads, table, right=(0, 2, 3, 4)), file=out)
    # A file hard-linked into several checkpoints is counted once, as du counts it.
    inodes = {k: v for _, _, u, _, _, _ in rows for k, v in u.inodes.items()}
    total = sum(inodes.values()) if inodes else sum(r[2].size for r in rows)
    print(f"{len(rows)} checkpoints, {human_bytes(total)} on disk", file=out)


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
    print(_text.table(("STEP", "OWN", "REPLICAS OF", "SIZE"), table, right=(0, 3)), file=out)
    return 0
