"""A run's directory on disk: its ``ckpt-<step>`` checkpoints and its ``checkpoint`` index.

The one home of the rules that :class:`jaxckpt.CheckpointManager`, ``jaxckpt ls`` and the
reader's "this is a manager's directory" message share: which names are steps, which steps are
committed, and how the index is written and read back.

The index (JSON) lists each committed step's time and metrics and ends with its own checksum
(:func:`jaxckpt.format.checksum.seal`). It is a cache: the committed step directories are the truth,
and an index that is missing, damaged, unsealed (written by an older jaxckpt) or unreadable is
rebuilt from them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from jaxckpt import storage as _storage
from jaxckpt.format import checksum as _checksum

PREFIX = "ckpt-"
INDEX = "checkpoint"
INDEX_VERSION = 2  # 2: the index ends with its own checksum
_STEP_NAME = re.compile(r"ckpt-(0|[1-9][0-9]*)", re.ASCII)  # ckpt-007 is no step's name


@dataclasses.dataclass(frozen=True)
class Entry:
    """What the index says of one committed step."""

    step: int
    time: float
    metrics: dict[str, Any]

    def as_json(self) -> str:
        """The entry as the index keeps it (so that NaN metrics compare equal)."""
        return json.dumps([self.step, self.time, self.metrics], sort_keys=True)


def step_of(name: str) -> int | None:
    """The step a directory name stands for (``ckpt-10`` -> 10), or None."""
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def step_name(step: int) -> str:
    return f"{PREFIX}{step}"


def committed_steps(directory: str) -> list[int]:
    """The steps of ``directory`` whose checkpoints are committed, oldest first."""
    steps = []
    store = _storage.at(directory)
    for name in store.names():
        step = step_of(name)
        if step is not None and store.child(name).is_committed():
            steps.append(step)
    return sorted(steps)


def index_bytes(entries: list[Entry]) -> bytes:
    """The index of ``entries`` (oldest first), sealed with its checksum."""
    doc = {
        "jaxckpt_manager_index": INDEX_VERSION,
        "latest_step": entries[-1].step if entries else None,
        "checkpoints": [
            {"step": e.step, "path": step_name(e.step), "time": e.time, "metrics": e.metrics}
            for e in entries
        ],
    }
    return _checksum.seal(json.dumps(doc, indent=1).encode())


@dataclasses.dataclass
class Index:
    """An index as read: its entries by step, or why it must be rebuilt (entries empty)."""

    entries: dict[int, Entry]
    problem: str | None = None  # None: absent or sound
    legacy: bool = False  # written by an older jaxckpt, without a checksum


def read_index(directory: str) -> Index:
    raw = _storage.at(directory).read(INDEX)
    if raw is None:
        return Index({})
    if not _checksum.is_sealed(raw):
        if raw.startswith(b'{\n "jaxckpt_manager_index": 1,'):
            return Index({}, "it has no checksum (an older jaxckpt wrote it)", legacy=True)
        return Index({}, "it is damaged (it fails its own crc32c checksum)")
    try:
        doc = json.loads(raw)
        entries = {
            int(c["step"]): Entry(int(c["step"]), float(c["time"]), dict(c["metrics"]))
            for c in doc["checkpoints"]
        }
    except (ValueError, KeyError, TypeError) as e:
        return Index({}, f"it is unreadable ({e})")
    return Index(entries)
