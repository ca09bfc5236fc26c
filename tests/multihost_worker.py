"""One process of a real multi-process jaxckpt job, started by tests/checkpoint/test_multihost.py.

Usage: ``python multihost_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT DIRECTORY``.
Every process has 4 CPU devices and joins the others through ``jax.distributed.initialize``.
It appends one JSON line per check to the file ``$MULTIHOST_RESULTS`` for the test to assert on
(and prints it after ``RESULT`` for people reading the log), and exits non-zero
with a traceback when one of its own checks fails.

Failures are injected by wrapping ``jaxckpt.checkpoint.write.write_arrays`` in this process only
(the real function runs first): ``raise`` an OSError, ``sleep`` past the barrier timeout, or
``kill`` this process with SIGKILL between writing its shards and the ``written`` barrier.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

SCENARIO, PID, NPROC, PORT, DIRECTORY = sys.argv[1:6]
PID_, NPROC_ = int(PID), int(NPROC)
HEARTBEAT_S = 10 if SCENARIO.startswith("kill") else 100

jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}",
    num_processes=NPROC_,
    process_id=PID_,
    initialization_timeout=60,
    heartbeat_timeout_seconds=HEARTBEAT_S,
)

from multihost_tree import SHAPES, Loader, expected  # noqa: E402

import jaxckpt as jc  # noqa: E402
from jaxckpt.checkpoint import incremental as _incremental  # noqa: E402
from jaxckpt.checkpoint import multihost as _multihost  # noqa: E402
from jaxckpt.checkpoint import plan as _plan  # noqa: E402
from jaxckpt.checkpoint import reader as _reader  # noqa: E402
from jaxckpt.checkpoint import write as _write  # noqa: E402


def save_mesh() -> jax.sharding.Mesh:
    """Rows of 2 devices; each row lies in one process (``jax.devices()`` is process-major)."""
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 2), ("x", "y"))


def other_mesh() -> jax.sharding.Mesh:
    """Another shape over the devices in reverse order: every process gets other slices."""
    return jax.sharding.Mesh(np.array(jax.devices()[::-1]).reshape(2, -1), ("a", "b"))


def global_array(name: str, sharding: jax.sharding.Sharding, dtype=np.float32) -> jax.Array:
    value = expected(name, dtype)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def make_tree(step: int) -> dict:
    m = save_mesh()
    return {
        "params": {
            "w": global_array("w", NamedSharding(m, P("x", "y"))),  # every device its shard
            "b": global_array("b", NamedSharding(m, P())),  # replicated on all devices
        },
        "opt": {
            "m": global_array("m", NamedSharding(m, P("x")), jnp.bfloat16),  # replicas in a process
            "c": global_array("c", NamedSharding(m, P(None, "y"))),  # replicas across processes
            "n": global_array("n", NamedSharding(m, P())),  # a 0-d array
        },
        "step": step,
        "host": {  # values local to each process, different in each: process 0's are saved
            "np": np.full(3, PID_, np.int32),
            "dev": jax.device_put(jnp.full(2, PID_ + 10, jnp.int32), jax.local_devices()[0]),
        },
        "loader": Loader(1000 * step + PID_),  # each process keeps its own position
    }


def restore_target(step: int) -> dict:
    o = other_mesh()
    return {
        "params": {
            "w": jax.ShapeDtypeStruct(
                SHAPES["w"], jnp.float32, sharding=NamedSharding(o, P("b", "a"))
            ),
            "b": jax.ShapeDtypeStruct(SHAPES["b"], jnp.float32, sharding=NamedSharding(o, P("b"))),
        },
        "opt": {
            # saved as bfloat16, restored as float32 (an exact cast)
            "m": jax.ShapeDtypeStruct(
                SHAPES["m"], jnp.float32, sharding=NamedSharding(o, P(None, "a"))
            ),
            "c": np.zeros(SHAPES["c"], np.float32),  # NumPy: the whole array in every process
            "n": jax.ShapeDtypeStruct((), jnp.float32),  # no sharding: this process's device 0
        },
        # a Python int saved, restored as a global array replicated over the other mesh
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(o, P())),
        "host": {"np": np.zeros(3, np.int32), "dev": jax.ShapeDtypeStruct((2,), jnp.int32)},
        "loader": Loader(-1),
    }


def check_restored(out: dict, target: dict, step: int, saved_by: int = NPROC_) -> int:
    """Compares ``out`` with the saved values bit for bit; returns the bytes it checked.

    ``saved_by``: how many processes saved it; with as many here, each process gets its own
    loader position back, else process 0's.
    """
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(target)
    assert out["loader"] is target["loader"]
    assert out["loader"].pos == 1000 * step + (PID_ if saved_by == NPROC_ else 0)
    assert out["step"].sharding.is_equivalent_to(target["step"].sharding, 0)
    for s in out["step"].addressable_shards:
        assert s.data.dtype == jnp.int32 and int(s.data) == step, s.data
    assert out["opt"]["n"].sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(np.asarray(out["opt"]["n"]), expected("n"))
    checked = 0
    for name, got, want in [
        ("w", out["params"]["w"], target["params"]["w"]),
        ("b", out["params"]["b"], target["params"]["b"]),
        ("m", out["opt"]["m"], target["opt"]["m"]),
    ]:
        ref = expected(name, jnp.bfloat16 if name == "m" else np.float32).astype(np.float32)
        assert got.dtype == want.dtype and got.shape == ref.shape
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (name, got.sharding)
        assert {s.device for s in got.addressable_shards} == set(jax.local_devices())
        for s in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), ref[s.index])
            checked += s.data.nbytes
    np.testing.assert_array_equal(out["host"]["np"], np.zeros(3, np.int32))
    np.testing.assert_array_equal(np.asarray(out["host"]["dev"]), np.full(2, 10, np.int32))
    assert type(out["opt"]["c"]) is np.ndarray
    np.testing.assert_array_equal(out["opt"]["c"], expected("c"))
    return checked


def report(check: str, **fields) -> None:
    """Appends one JSON line to the file the test named (one write, so a kill cannot halve it)."""
    line = json.dumps({"check": check, "process": PID_, **fields})
    print("RESULT " + line, flush=True)
    fd = os.open(os.environ["MULTIHOST_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def inject(kind: str, path_part: str) -> None:
    """Makes this process fail in the way ``kind`` while saving a path containing ``path_part``."""
    real = _write.write_arrays

    def write_then_fail(root, arrays, packs, budget, *rest):
        real(root, arrays, packs, budget, *rest)
        if path_part not in root:
            return
        if kind == "raise":
            raise OSError("No space left on device (injected by the test)")
        if kind == "sleep":
            time.sleep(_multihost.timeout_s() + 1.5)
        if kind == "kill":
            report("about-to-die", time=time.time())
            os.kill(os.getpid(), signal.SIGKILL)

    _write.write_arrays = write_then_fail


def expect_error(check: str, fn) -> None:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:
        report(check, error=type(e).__name__, message=str(e), seconds=time.monotonic() - t0)
    else:
        report(check, error=None, seconds=time.monotonic() - t0)


@contextlib.contextmanager
def count_reads():
    """Counts the elements each restore asks TensorStore for, per leaf (one dict, filled in)."""
    read: dict[str, int] = {}
    real = _reader.Reader.read_many

    def counting(self, requests, then=None):
        for path, index in requests:
            shape = self.record(path)["shape"]
            n = np.empty(shape, np.bool_)[index].size if index is not None else int(np.prod(shape))
            read[path] = read.get(path, 0) + n
        return real(self, requests, then)

    _reader.Reader.read_many = counting
    try:
        yield read
    finally:
        _reader.Reader.read_many = real


def written_pieces(tree: dict) -> dict[str, int]:
    """How many pieces (distinct shards) this process writes for each array."""
    return {a.loc: len(a.pieces) for a in _plan.plan(tree)[1]}


def scenario_main() -> None:
    """A manager saves and restores across both processes; preemption; then three failures."""
    report("pieces", pieces=written_pieces(make_tree(1)))
    run = os.path.join(DIRECTORY, "run")
    with jc.CheckpointManager(run, max_to_keep=2, save_interval_steps=1000) as mngr:
        for step in (1, 2, 3):  # asynchronous saves; process 0 alone deletes step 1
            assert mngr.save(step, make_tree(step), force=True)
        mngr.wait_until_finished()
        report("manager", steps=mngr.steps, latest=mngr.latest_step)
        # Incremental saves: (bytes written, bytes linked) by this process, per step.
        done = {str(s): _incremental.stats(mngr.checkpoint_path(s)) for s in (1, 2, 3)}
        report("incremental", stats=done)
        for step in mngr.steps:
            target = restore_target(step)
            with count_reads() as read:
                checked = check_restored(mngr.restore(step, target), target, step)
            np.testing.assert_array_equal(mngr.restore(step)["params"]["w"], expected("w"))
            report("restored", step=step, bytes=checked, read=read)
        preempted_save(mngr)

    # jc.save_async and jc.save directly, without a manager
    h = jc.save_async(os.path.join(DIRECTORY, "ckpt-a"), make_tree(7), step=7)
    assert h.wait(60) == os.path.join(DIRECTORY, "ckpt-a")
    target = restore_target(7)
    check_restored(jc.restore(h.path, target), target, 7)

    # A peer fails with an ordinary error: every process stops at the next barrier, at once.
    if PID_ == 1:
        inject("raise", "ckpt-fail")
    expect_error("peer-error", lambda: jc.save(os.path.join(DIRECTORY, "ckpt-fail"), make_tree(3)))

    # Processes disagree on the path: the mistake is caught before anything is written.
    name = "ckpt-4" if PID_ == 0 else "ckpt-4b"
    expect_error("path-mismatch", lambda: jc.save(os.path.join(DIRECTORY, name), make_tree(4)))

    # A path that is not shared: /proc/self/cwd is each process's own working directory.
    local = os.path.join(DIRECTORY, f"local-{PID_}")
    os.makedirs(local)
    os.chdir(local)
    expect_error("not-shared", lambda: jc.save("/proc/self/cwd/ckpt-1", make_tree(6)))
    os.chdir(DIRECTORY)

    # A peer hangs past the barrier timeout: the others raise a timeout naming it.
    _multihost.barrier("before-slow", timeout=60)  # start together: only the hang is late
    os.environ[_multihost.TIMEOUT_ENV] = "4"
    if PID_ == 1:
        inject("sleep", "ckpt-slow")
    expect_error("peer-hangs", lambda: jc.save(os.path.join(DIRECTORY, "ckpt-slow"), make_tree(5)))


def preempted_save(mngr: jc.CheckpointManager) -> None:
    """A training loop in lockstep; process 1 gets SIGTERM; all save at the same step."""
    for step in range(10, 300):
        if PID_ == 1 and step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier catches it
        if mngr.reached_preemption(step):
            assert mngr.save(step, make_tree(step), force=True)
            mngr.wait_until_finished()
            report("preempted", step=step, steps=mngr.steps, latest=mngr.latest_step)
            return
        _multihost.barrier(f"train-step-{step}", timeout=30)  # training keeps them in step
        time.sleep(0.02)
    raise AssertionError("no preemption sync point was reached")


def scenario_kill() -> None:
    """Commit step 1; then one process is SIGKILLed mid-save of step 2.

    ``kill-last``: the last process dies (the others see it through missed heartbeats);
    ``kill-first``: process 0, which runs the coordination service, dies.
    """
    mngr = jc.CheckpointManager(DIRECTORY)
    mngr.save(1, make_tree(1))
    mngr.wait_until_finished()
    report("saved", step=1)
    if PID_ == (0 if SCENARIO == "kill-first" else NPROC_ - 1):
        inject("kill", "ckpt-2")
    os.environ[_multihost.TIMEOUT_ENV] = "60"

    def save_2() -> None:
        mngr.save(2, make_tree(2))
        mngr.wait_until_finished()

    expect_error("peer-killed", save_2)


def scenario_restart() -> None:
    """A restarted job, with another process count, restores step 1, then saves step 3."""
    mngr = jc.CheckpointManager(DIRECTORY, max_to_keep=5)  # removes the killed save's debris
    report("manager", steps=mngr.steps, latest=mngr.latest_step)
    target = restore_target(1)
    checked = check_restored(mngr.restore(target=target), target, 1, saved_by=2)
    report("restored", step=1, bytes=checked)
    tree = make_tree(3)
    report("pieces", pieces=written_pieces(tree))
    mngr.save(3, tree)
    target = restore_target(3)
    checked = check_restored(mngr.restore(3, target), target, 3)
    report("restored", step=3, bytes=checked)
    mngr.close()
    report("manager-after", steps=mngr.steps, latest=mngr.latest_step)


def scenario_objstore() -> None:
    """Both processes save through a manager to an object store (DIRECTORY is a URL)."""
    mngr = jc.CheckpointManager(DIRECTORY, max_to_keep=1)
    for step in (1, 2):
        mngr.save(step, make_tree(step))
    mngr.wait_until_finished()
    report("manager", steps=mngr.steps, latest=mngr.latest_step)
    target = restore_target(2)
    with count_reads() as read:
        checked = check_restored(mngr.restore(target=target), target, 2)
    report("restored", step=2, bytes=checked, read=read)


SCENARIOS = {"main": scenario_main, "restart": scenario_restart, "objstore": scenario_objstore}
SCENARIOS.update({"kill-last": scenario_kill, "kill-first": scenario_kill})
SCENARIOS[SCENARIO]()
_multihost.barrier("worker-done", timeout=60)
report("done")
