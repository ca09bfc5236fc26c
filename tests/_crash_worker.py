"""A training-like process for test_crash.py: saves every step's data until it is killed.

Usage: python _crash_worker.py DIRECTORY MODE N  (N: uint32 elements of each big leaf)

MODE is sync or async, optionally with ``+frozen``: the tree then also holds ``frozen``, one
``jax.Array`` (``base_of(N)``) that never changes, which incremental saves link.
"""

import sys
import time

import jax.numpy as jnp
import numpy as np

import jaxckpt as jc


def base_of(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint32)


def key_of(step: int) -> np.uint32:
    return np.uint32((step * 2654435761) % 2**32)


def tree_of(step: int, base: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    """The data of ``step``, a deterministic function of it: ``a = base + k``, ``b = base ^ k``.

    ``a`` and ``b`` are buffers reused from step to step (fresh pages cost more than the save).
    """
    k = key_of(step)
    np.add(base, k, out=a)
    np.bitwise_xor(base, k, out=b)
    return {
        "params": {"a": a, "b": b, "small": np.full((3, 5), step, np.float32)},
        "opt": [np.int64(step), {"lr": np.float32(step) / 7}],
        "step": step,
    }


def main() -> None:
    directory, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    base = base_of(n)
    a, b = np.empty_like(base), np.empty_like(base)
    frozen = jnp.asarray(base) if mode.endswith("+frozen") else None
    keep = 2 if frozen is not None else 1  # checkpoints sharing files, one deleted per save
    mngr = jc.CheckpointManager(directory, max_to_keep=keep, async_save=mode.startswith("async"))
    step = (mngr.latest_step or 0) + 1
    print("start", step, time.monotonic(), flush=True)
    while True:
        tree = tree_of(step, base, a, b)
        if frozen is not None:
            tree["frozen"] = frozen
        mngr.save(step, tree, metrics={"loss": 1.0 / step})
        # Async: the save returned once snapshotted; latest_step is the newest known committed.
        print("saved", step, time.monotonic(), mngr.latest_step, flush=True)
        step += 1


if __name__ == "__main__":
    main()
