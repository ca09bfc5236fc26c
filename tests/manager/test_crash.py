"""Crash safety: a real training-like process is SIGKILLed at random moments while it saves.

After every kill a new manager must list only checkpoints that restore bit-exactly with their
step's data, keep every step the process had reported saved, and leave no debris.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxckpt as jc

sys.path.insert(0, str(Path(__file__).parent.parent))
from _crash_worker import base_of, key_of, tree_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N = 25 * 2**20  # uint32 elements of each of the two big leaves: 200 MiB per step
TRIALS = 3  # per mode: 6 kills in all


@pytest.fixture
def fast_dir(tmp_path):
    """A directory in memory (/dev/shm) where there is room, else on disk."""
    shm = "/dev/shm"
    roomy = os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * 2**30
    base = shm if roomy else None
    d = tempfile.mkdtemp(prefix="jaxckpt-crash-", dir=base) if base else str(tmp_path / "run")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Worker:
    def __init__(self, directory: str, mode: str):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        env["JAX_PLATFORMS"] = "cpu"
        env["JAXCKPT_ASYNC_HOST_BYTES"] = str(3 * 8 * N)  # at most 3 saves' snapshots in flight
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_crash_worker.py"), directory, mode, str(N)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, enough, timeout: float = 120.0) -> None:
        """Waits until ``enough(self.saved())``."""
        deadline = time.monotonic() + timeout
        while not enough(self.saved()):
            assert self.proc.poll() is None, "the worker exited early:\n" + "\n".join(self.lines)
            assert time.monotonic() < deadline, "the worker is stuck:\n" + "\n".join(self.lines)
            time.sleep(0.01)

    @property
    def times(self) -> list[float]:
        """When the worker started, then when each save returned (its monotonic clock)."""
        return [float(line.split()[2]) for line in list(self.lines)]

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # a failed wait: leave no process behind
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join()
        assert self.proc.returncode == -signal.SIGKILL, "\n".join(self.lines)

    def saved(self) -> list[int]:
        return [int(line.split()[1]) for line in list(self.lines) if line.startswith("saved ")]

    def committed(self) -> int | None:
        """The newest step this worker had seen committed (None before its first commit)."""
        lines = list(self.lines)
        if not lines:
            return None
        first = int(lines[0].split()[1])  # "start STEP TIME": the first step it saves
        reported = [line.split()[3] for line in lines if line.startswith("saved ")]
        steps = [int(s) for s in reported if s != "None"]
        newest = max(steps, default=None)
        return newest if newest is not None and newest >= first else None


def check_step(mngr: jc.CheckpointManager, step: int, base: np.ndarray) -> None:
    got = mngr.restore(step)
    tiny = np.zeros(0, np.uint32)
    want = tree_of(step, tiny, tiny.copy(), tiny.copy())  # the structure and the small leaves
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    big = [got["params"].pop("a"), got["params"].pop("b")]
    del want["params"]["a"], want["params"]["b"]
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(g, w)
    # Undo the step's key in place and compare with the base: for uint32, equality is
    # bit-exactness (np.array_equal costs milliseconds here, assert_array_equal seconds).
    for arr in big:
        assert arr.dtype == np.uint32 and arr.shape == base.shape
    big[0] -= key_of(step)
    big[1] ^= key_of(step)
    assert np.array_equal(big[0], base) and np.array_equal(big[1], base), f"step {step}"
    assert mngr.metrics(step) == {"loss": 1.0 / step}


def check_directory(d: str, committed_at_least: int | None, base: np.ndarray) -> list[int]:
    mngr = jc.CheckpointManager(d, max_to_keep=1)
    names = os.listdir(d)
    assert not [n for n in names if jc.storage.TMP_MARK in n], names
    for name in names:
        if name.startswith("ckpt-"):
            assert os.path.isfile(os.path.join(d, name, "COMMIT")), names
    assert sorted(n for n in names if n.startswith("ckpt-")) == sorted(
        os.path.basename(p) for p in mngr.checkpoints
    )
    if committed_at_least is not None:
        assert mngr.latest_step is not None and mngr.latest_step >= committed_at_least
    for step in mngr.steps:
        check_step(mngr, step, base)
    return mngr.steps


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_random_moments_loses_nothing_committed(fast_dir, mode):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    base = base_of(N)
    for trial in range(TRIALS):
        with Worker(fast_dir, mode) as worker:
            # Wait for two saves and a known commit (async saves return once snapshotted, with
            # earlier ones maybe still writing), then kill at a random moment of a save or so.
            worker.wait_for(lambda saved: len(saved) >= 2 and worker.committed() is not None)
            step_time = worker.times[-1] - worker.times[-2]
            time.sleep(rng.uniform(0.0, 1.5) * step_time)
            worker.kill()
        saved = worker.saved()
        committed = saved[-1] if mode == "sync" else worker.committed()
        try:
            check_directory(fast_dir, committed, base)
        except AssertionError as e:
            raise AssertionError(
                f"trial {trial} (seed {seed}): the worker said {worker.lines}"
            ) from e
    assert jc.CheckpointManager(fast_dir).latest_step >= TRIALS
