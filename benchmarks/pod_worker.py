"""One process of bench.py's W6: a 4-process job on this machine, one CPU device each.

Usage: ``python pod_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY MIB REPEATS``. Each
process holds ``MIB`` MiB of float32 state (4 arrays sharded by rows over the job's devices)
and is its own host. Per repeat it times, side by side on the same disk: a local-tier save with
one peer replica, and an asynchronous persistent save (blocking: the ``save`` call; durable:
until ``wait_until_finished`` returns on every process), the state changed before each round as
training changes it. Then, ``REPEATS`` rounds, the tools taking turns within each: the restore
of a lost host. For a local tier process 2's local directory is deleted (a new host) and new
managers restore the newest local step, process 2's part coming from its replica; the
persistent tier restores the same state; each after the page cache was dropped (where this
process may), as after a restart, and checked bit for bit. Prints one JSON line per figure:
``POD {"op": ..., "tool": ..., "seconds": ...}``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

PID, N, PORT, DIRECTORY, MIB, REPEATS = sys.argv[1:7]
PID_, N_, MIB_, REPEATS_ = int(PID), int(N), float(MIB), int(REPEATS)
os.environ["JAXCKPT_HOST_ID"] = f"host-{PID_}"
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}", num_processes=N_, process_id=PID_
)

import jaxckpt as jc  # noqa: E402
from jaxckpt.checkpoint import multihost as _multihost  # noqa: E402

# The local tier on the disk the persistent tier uses, and in memory (/dev/shm), if there.
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None
LOCALS = {"local+1 replica": os.path.join(DIRECTORY, f"local-{PID_}")}
if SHM:
    LOCALS["local /dev/shm"] = os.path.join(SHM, f"jaxckpt-W6-{PORT}", f"local-{PID_}")


def state() -> dict:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    rows = max(1, int(MIB_ * (1 << 20) / 4 / 4 / 1024))  # per process and array
    rng = np.random.default_rng(PID_)
    out = {}
    for i in range(4):
        local = rng.standard_normal((rows, 1024), dtype=np.float32)
        sharding = NamedSharding(mesh, P("x"))
        shape = (rows * N_, 1024)
        out[f"a{i}"] = jax.make_array_from_single_device_arrays(
            shape, sharding, [jax.device_put(local, jax.local_devices()[0])]
        )
    return out


def drop_caches() -> None:
    """A cold page cache, as after a restart (root only; /dev/shm keeps its files in memory,
    as a RAM-disk local tier does)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def emit(op: str, tool: str, seconds: float) -> None:
    print("POD " + json.dumps({"op": op, "tool": tool, "seconds": seconds}), flush=True)


def local_manager(tool: str) -> jc.CheckpointManager:
    return jc.CheckpointManager(
        os.path.join(DIRECTORY, "run-shm" if "shm" in tool else "run-local"),
        save_interval_steps=1 << 40,  # the persistent tier of this one never saves (step > 0)
        local_directory=LOCALS[tool],
        local_save_interval_steps=1,
        local_max_to_keep=2,
        peer_replicas=1,
    )


def timed_save(mngr: jc.CheckpointManager, step: int, tree: dict, tool: str, keep: bool) -> None:
    _multihost.barrier(f"before-{tool}-{step}", timeout=600)
    t = time.perf_counter()
    assert mngr.save(step, tree)
    block = time.perf_counter() - t
    mngr.wait_until_finished()
    if keep:
        emit("async_block", tool, block)
        emit("async_total", tool, time.perf_counter() - t)


def restore_lost_host(tool: str, tree: dict, abstract: dict, r: int, keep: bool) -> None:
    """One restart after losing process 2's host: new managers (for a local tier, process 2's
    local directory gone), a cold page cache, then the restore, checked bit for bit."""
    if tool in LOCALS and PID_ == 2:  # a new host in its place: nothing of its own survived
        shutil.rmtree(LOCALS[tool], ignore_errors=True)
    _multihost.barrier(f"host-lost-{tool}-{r}", timeout=600)
    if tool in LOCALS:
        mngr = local_manager(tool)
    else:
        mngr = jc.CheckpointManager(os.path.join(DIRECTORY, "run"), max_to_keep=2)
    _multihost.barrier(f"before-drop-{tool}-{r}", timeout=600)
    if PID_ == 0:
        drop_caches()
    _multihost.barrier(f"before-restore-{tool}-{r}", timeout=600)
    t = time.perf_counter()
    out = mngr.restore(target=abstract)
    jax.block_until_ready(out)
    if keep:
        emit("restore_lost_host", tool, time.perf_counter() - t)
    for k in tree:
        got, want = out[k].addressable_data(0), tree[k].addressable_data(0)
        assert np.array_equal(np.asarray(got), np.asarray(want)), k
    del out, got
    mngr.close()


def main() -> None:
    tree = state()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    managers = {tool: local_manager(tool) for tool in LOCALS}
    managers["persistent"] = jc.CheckpointManager(os.path.join(DIRECTORY, "run"), max_to_keep=2)
    # Repeat 0 is not timed: the first snapshot of each pays for touching fresh memory.
    for r in range(REPEATS_ + 1):
        # Trained state: new values every step, so no tier links what the last save wrote.
        tree = jax.block_until_ready(jax.tree.map(lambda x: x + 1, tree))
        for tool, mngr in managers.items():
            timed_save(mngr, r + 1, tree, tool, keep=r > 0)
    for mngr in managers.values():
        mngr.close()
    tools = list(managers)
    managers.clear()
    # Round 0 is not timed: each tool's first restore touches the memory a restore allocates
    # (the reader's buffers, the arrays), which this benchmark's processes keep once touched
    # (bench.py's GLIBC_TUNABLES); without it whichever tool restored first would pay this
    # VM's first-touch cost alone.
    for r in range(REPEATS_ + 1):
        for tool in tools:
            restore_lost_host(tool, tree, abstract, r, keep=r > 0)
    _multihost.barrier("pod-done", timeout=600)
    if SHM:
        shutil.rmtree(os.path.dirname(LOCALS["local /dev/shm"]), ignore_errors=True)


main()
