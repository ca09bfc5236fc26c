"""The trees saved in tests/data/v2_*: checkpoints of format version 2, written by jaxckpt at
commit 8535ec8 (before COMMIT held checksums) with ``python tests/v2_trees.py``. Kept so that
tests/format/test_checksums.py restores them bit-exactly with today's reader."""

from __future__ import annotations

import os
import sys
from typing import Any

import ml_dtypes
import numpy as np

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def plain() -> dict[str, Any]:
    """A dict of arrays (one per path, one of them with all-zero chunks) and Python values."""
    return {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "b": np.array([1, -2, 3], np.int64),
        "h": np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16),
        "z": np.zeros((4, 3), np.float64),
        "s": np.float32(2.5),
        "n": 7,
        "name": "v2",
    }


def packed_split() -> dict[str, Any]:
    """24 blocks of 50 small leaves: packed into ~pack/0, its record split over the blocks."""
    return {
        f"block{b}": {f"leaf{i}": np.full((2,), b * 100 + i, np.int32) for i in range(50)}
        for b in range(24)
    }


def main() -> None:
    import jaxckpt as jc

    jc.save(os.path.join(HERE, "v2_plain"), plain(), step=10, metrics={"loss": 0.25})
    jc.save(os.path.join(HERE, "v2_packed_split"), packed_split(), step=20)


if __name__ == "__main__":
    sys.exit(main())
