"""A trainer for test_concurrent_runs.py.

Usage: python _concurrent_worker.py DIRECTORY GO pause|hold
- pause: saves step 1, then step 2 pausing after its first chunk file until the file GO exists;
  prints "writing", then "saved" or "failed: <error>".
- hold: saves step 1 and prints "ready", then keeps its manager open until killed.
"""

import os
import sys
import time

import numpy as np

import jaxckpt as jc
from jaxckpt.storage import chunk_files as _chunks


def tree_of(step: int) -> dict:
    return {"w": np.full((64, 1024), step, np.float32), "b": np.arange(6.0) + step}


def main() -> None:
    directory, go, mode = sys.argv[1:4]
    mngr = jc.CheckpointManager(directory, async_save=False, max_to_keep=None)
    mngr.save(1, tree_of(1))
    if mode == "hold":
        print("ready", flush=True)
        time.sleep(600)
        return
    write_chunk = _chunks.write_chunk

    def paused(path: str, data: np.ndarray) -> None:
        write_chunk(path, data)
        if not os.path.exists(go):
            print("writing", flush=True)
            while not os.path.exists(go):
                time.sleep(0.01)

    _chunks.write_chunk = paused
    try:
        mngr.save(2, tree_of(2))
        print("saved", flush=True)
    except jc.CheckpointError as e:
        print(f"failed: {e}", flush=True)
    mngr.close()


if __name__ == "__main__":
    main()
