"""The processes of the soak (benchmarks/soak.py): the saving process its kill trials SIGKILL,
and the one process that saves 1,000 times with rotation while its resources are sampled.

    python soak_worker.py kill MODE DIRECTORY    # MODE: save, save_async, manager, manager_async
    python soak_worker.py memory MODE DIRECTORY SAVES   # MODE: async or sync

The kill worker saves ``tree_of(step)`` for step after step until it is killed, and prints one
line per event on stdout: ``B phase t`` / ``E phase t`` around each phase of a save (the
functions it names are wrapped here, in this process only: jaxckpt is unchanged), ``saved
step t`` after each save call, and ``committed [steps]``, the steps it knows committed. With
``SOAK_KILL=phase:nth:before|after`` it SIGKILLs itself just before or after the ``nth`` call
of that phase, so a kill lands exactly at a boundary no outside timer can hit (a rename takes
microseconds).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_dtypes
import numpy as np

import jaxckpt as jc
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import save_steps as _steps
from jaxckpt.checkpoint import snapshot as _snapshot
from jaxckpt.checkpoint import write as _write
from jaxckpt.storage.local import LocalStore

KEEP = 3  # every manager of the soak keeps the newest 3 checkpoints

# (module, function, phase): the steps of a save, in the order a save runs them.
PHASES = [
    (_steps, "prepare", "plan"),
    (_snapshot, "snapshot", "snapshot"),
    (LocalStore, "begin", "mkdir"),
    (_write, "write_arrays", "chunks"),
    (_write, "write_json_files", "metadata"),
    (_write, "durable", "fsync"),
    (LocalStore, "write_durable", "commit"),  # only the COMMIT marker: see _wrap
    (LocalStore, "commit", "rename"),
    (LocalStore, "retire", "retire"),
    (LocalStore, "delete", "delete"),
    (LocalStore, "write_atomic", "index"),
]
SYNC_ONLY = {"snapshot"}  # phases a synchronous save never runs
MANAGER_ONLY = {"retire", "delete", "index"}
MODES = ["save", "save_async", "manager", "manager_async"]


def phases_of(mode: str) -> list[str]:
    """The phases a save of ``mode`` goes through."""
    out = []
    for _, _, phase in PHASES:
        if phase in SYNC_ONLY and not mode.endswith("async"):
            continue
        if phase in MANAGER_ONLY and not mode.startswith("manager"):
            continue
        out.append(phase)
    return out


# ---------------------------------------------------------------------------- the tree


def _fill(shape: tuple[int, ...], dtype: Any, salt: int) -> np.ndarray:
    """Values that depend on every element's index and on ``salt`` (the step and the leaf)."""
    n = int(np.prod(shape, dtype=np.int64))
    x = np.arange(n, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(salt % 2**32)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        out = (x & 1).astype(bool)
    elif dtype.kind in "iu":
        out = x.astype(dtype)
    else:  # small integers: exact in float16 and bfloat16 too
        out = (x % 251).astype(np.float32).astype(dtype)
    return out.reshape(shape)


def tree_of(step: int, on_device: bool = True) -> dict[str, Any]:
    """The data of ``step``, a deterministic function of it.

    Even steps: 31 leaves, 4.6 MiB (an embedding, 8 layers, a head), too few small leaves to be
    packed. Odd steps: two 1 MiB arrays and 80 small leaves of 5 dtypes, which a save packs.
    """
    bf16 = ml_dtypes.bfloat16
    salt = iter(range(step * 1000, step * 1000 + 1000))
    if step % 2 == 0:
        tree: dict[str, Any] = {
            "embed": _fill((1024, 512), np.float32, next(salt)),
            "layers": [
                {
                    "w": _fill((256, 256), np.float32, next(salt)),
                    "b": _fill((256,), np.float32, next(salt)),
                    "scale": _fill((256,), bf16, next(salt)),
                }
                for _ in range(8)
            ],
            "head": _fill((512, 512), bf16, next(salt)),
            "rng": _fill((2,), np.uint32, next(salt)),
        }
    else:
        kinds = [np.float32, np.int32, np.float16, np.bool_, np.uint8]
        tree = {
            "big": [_fill((512, 512), np.float32, next(salt)) for _ in range(2)],
            "small": {
                f"p{i:02d}": _fill((i % 16 + 1, 64), kinds[i % 5], next(salt)) for i in range(80)
            },
        }
    if on_device:
        tree = jax.tree_util.tree_map(jax.device_put, tree)
    tree["step"] = step
    return tree


def metrics_of(step: int) -> dict[str, float]:
    return {"loss": 1.0 / step}


def differences(got: Any, step: int) -> list[str]:
    """How a restored tree differs from ``tree_of(step)``, bit for bit (empty: identical)."""
    want = tree_of(step, on_device=False)
    if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(want):
        return [f"step {step}: the tree's structure differs"]
    out = []
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    for (path, g), w in zip(flat_got, jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        if g.dtype != w.dtype or g.shape != w.shape or g.tobytes() != w.tobytes():
            out.append(f"step {step}: leaf {jax.tree_util.keystr(path)} differs")
    return out


# ---------------------------------------------------------------------------- kill worker

_out = threading.Lock()


def say(*words: Any) -> None:
    """One line on stdout, written whole at once (events come from several threads)."""
    line = " ".join(str(w) for w in words) + "\n"
    with _out:
        os.write(1, line.encode())


def _wrap(module: Any, name: str, phase: str, kill: tuple[str, int, str] | None) -> None:
    fn = getattr(module, name)
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if phase == "commit" and args[1:2] != (_storage.COMMIT,):
            return fn(*args, **kwargs)
        calls += 1
        doomed = kill is not None and kill[0] == phase and kill[1] == calls
        if doomed and kill[2] == "before":
            say("K", phase, "before", time.monotonic())
            os.kill(os.getpid(), signal.SIGKILL)
        say("B", phase, time.monotonic())
        out = fn(*args, **kwargs)
        say("E", phase, time.monotonic())
        if doomed:
            say("K", phase, "after", time.monotonic())
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(module, name, wrapped)


def install_hooks(kill: str | None) -> None:
    parsed = None
    if kill:
        phase, nth, when = kill.split(":")
        parsed = (phase, int(nth), when)
    for module, name, phase in PHASES:
        _wrap(module, name, phase, parsed)


def latest_committed(directory: str) -> int:
    path = jc.latest_checkpoint(directory)
    return 0 if path is None else int(os.path.basename(path).split("-")[1])


def kill_worker(mode: str, directory: str) -> None:
    install_hooks(os.environ.get("SOAK_KILL"))
    if mode.startswith("manager"):
        mngr = jc.CheckpointManager(directory, max_to_keep=KEEP, async_save=mode.endswith("async"))
        step = (mngr.latest_step or 0) + 1
    else:
        mngr, step = None, latest_committed(directory) + 1
    say("start", step, time.monotonic())
    done: list[int] = []  # plain saves: the steps this process saw commit
    prev = None  # save_async: the save in flight before this one
    while True:
        path = os.path.join(directory, f"ckpt-{step}")
        if mngr is not None:
            mngr.save(step, tree_of(step), metrics=metrics_of(step))
            committed = mngr.steps
        elif mode == "save":
            jc.save(path, tree_of(step), step=step, metrics=metrics_of(step))
            done.append(step)
            committed = done
        else:  # two saves in flight at a time: this one snapshotted, the previous one writing
            handle = jc.save_async(path, tree_of(step), step=step, metrics=metrics_of(step))
            if prev is not None:
                prev[1].wait()
                done.append(prev[0])
            prev = (step, handle)
            committed = done
        say("saved", step, time.monotonic())
        say("committed", json.dumps(committed))
        step += 1


# ---------------------------------------------------------------------------- memory soak


def memory_run(mode: str, directory: str, saves: int) -> None:
    """Saves ``saves`` times with rotation, sampling RSS, open files and threads after each."""
    import psutil

    me = psutil.Process()
    samples = []
    mngr = jc.CheckpointManager(directory, max_to_keep=KEEP, async_save=mode == "async")
    start = time.monotonic()
    for step in range(1, saves + 1):
        mngr.save(step, tree_of(step), metrics=metrics_of(step))
        in_flight = len(mngr._pending)  # saves snapshotted and not yet known committed
        samples.append([me.memory_info().rss, me.num_fds(), me.num_threads(), in_flight])
    mngr.close()
    seconds = time.monotonic() - start
    closed = [me.memory_info().rss, me.num_fds(), me.num_threads()]
    kept = jc.CheckpointManager(directory, max_to_keep=KEEP).steps
    wrong = [d for s in kept for d in differences(jc.restore(f"{directory}/ckpt-{s}"), s)]
    names = sorted(os.listdir(directory))
    result = {"samples": samples, "closed": closed, "seconds": seconds, "kept": kept}
    print(json.dumps({**result, "wrong": wrong, "names": names}))


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        kill_worker(sys.argv[2], sys.argv[3])
    else:
        memory_run(sys.argv[2], sys.argv[3], int(sys.argv[4]))
