"""What the multi-process tests' workers save and the test process checks: shared by
tests/multihost_worker.py (one process of the job) and tests/checkpoint/test_multihost.py."""

from __future__ import annotations

import numpy as np

SHAPES = {"w": (16, 8), "m": (16, 8), "c": (4, 8), "b": (8,), "n": ()}


def expected(name: str, dtype=np.float32) -> np.ndarray:
    """The value every array of the saved tree holds, known to every process and to the test."""
    shape = SHAPES[name]
    base = {"w": 1.0, "m": -3.0, "c": 100.0, "b": 7.0, "n": 42.0}[name]
    return (np.arange(int(np.prod(shape))).reshape(shape) * 0.5 + base).astype(dtype)


class Loader:
    """A data iterator: each host reads its own part of the data, at its own position."""

    def __init__(self, pos: int):
        self.pos = pos

    def get_state(self) -> dict:
        return {"pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.pos = state["pos"]
