"""One process of a real 4-process training job with a manager's local tier, started by
tests/manager/test_local_tier.py.

Usage: ``python local_tier_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT DIRECTORY``. Each
process has 4 CPU devices, is its own host (``JAXCKPT_HOST_ID``), saves persistently to
``DIRECTORY/run`` every 20 steps and locally to ``DIRECTORY/local-<id>`` every 5 steps (one
peer replica: process p's part also lies with process p+1). It appends one JSON line per check
to ``$MULTIHOST_RESULTS`` (as tests/multihost_worker.py does).
"""

from __future__ import annotations

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
os.environ["JAXCKPT_HOST_ID"] = f"host-{PID_}"  # every process its own host
os.environ["JAXCKPT_BARRIER_TIMEOUT_S"] = "60"
if SCENARIO.endswith("-kv"):  # parts travel through JAX's key-value store, not direct TCP
    os.environ["JAXCKPT_LOCAL_TRANSPORT"] = "kv"
    SCENARIO = SCENARIO[: -len("-kv")]

jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}",
    num_processes=NPROC_,
    process_id=PID_,
    initialization_timeout=60,
    heartbeat_timeout_seconds=10,
)

from multihost_tree import SHAPES, Loader, expected  # noqa: E402

import jaxckpt as jc  # noqa: E402
from jaxckpt.checkpoint import multihost as _multihost  # noqa: E402
from jaxckpt.checkpoint import write as _write  # noqa: E402

RUN = os.path.join(DIRECTORY, "run")
LOCAL = os.path.join(DIRECTORY, f"local-{PID_}")
DEAD = os.path.join(DIRECTORY, "victim-about-to-die")


def mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 2), ("x", "y"))


def value(name: str, step: int, dtype=np.float32) -> np.ndarray:
    return (expected(name, np.float32) + step).astype(dtype)


def state(step: int) -> dict:
    m = mesh()
    specs = {"w": (P("x", "y"), np.float32), "b": (P(), np.float32), "m": (P("x"), jnp.bfloat16)}
    arrays = {}
    for name, (spec, dtype) in specs.items():
        v = value(name, step, dtype)
        arrays[name] = jax.make_array_from_callback(
            v.shape, NamedSharding(m, spec), lambda i, v=v: v[i]
        )
    return {
        "params": {"w": arrays["w"], "b": arrays["b"]},
        "opt": {"m": arrays["m"]},
        "step": step,
        "loader": Loader(1000 * step + PID_),  # each process its own position
    }


def target() -> dict:
    abstract = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        state(0),
    )
    abstract["loader"] = Loader(-1)
    return abstract


def check(out: dict, step: int) -> None:
    """``out`` holds exactly what was saved at ``step``, on this process's devices."""
    assert out["step"] == step, out["step"]
    assert out["loader"].pos == 1000 * step + PID_, out["loader"].pos
    for name, got in [("w", out["params"]["w"]), ("b", out["params"]["b"]), ("m", out["opt"]["m"])]:
        want = value(name, step, jnp.bfloat16 if name == "m" else np.float32)
        assert got.dtype == want.dtype and got.shape == SHAPES[name]
        for s in got.addressable_shards:
            assert np.asarray(s.data).tobytes() == want[s.index].tobytes(), (name, s.index)


def report(check_name: str, **fields) -> None:
    line = json.dumps({"check": check_name, "process": PID_, **fields})
    print("RESULT " + line, flush=True)
    fd = os.open(os.environ["MULTIHOST_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def manager() -> jc.CheckpointManager:
    return jc.CheckpointManager(
        RUN,
        max_to_keep=2,
        save_interval_steps=20,
        local_directory=LOCAL,
        local_save_interval_steps=5,
        local_max_to_keep=2,
        peer_replicas=1,
    )


def train(mngr: jc.CheckpointManager, start: int, stop: int) -> None:
    for step in range(start, stop + 1):
        mngr.save(step, state(step))


def end_job(victim: int) -> None:
    """``victim`` is killed with SIGKILL; the others end, as a scheduler tears a job down."""
    if PID_ == victim:
        with open(DEAD, "w") as f:
            f.write("now")
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not os.path.exists(DEAD) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    report("torn-down")
    os._exit(0)


def scenario_first() -> None:
    """Steps 0-30: persistent saves at 0 and 20, local ones every 5; then process 2 dies."""
    mngr = manager()
    assert mngr.latest_step is None
    train(mngr, 0, 30)
    mngr.wait_until_finished()
    report("saved", steps=mngr.steps, local=mngr._local.steps, latest=mngr.latest_step)
    _multihost.barrier("all-saved", timeout=60)
    end_job(victim=2)


def restore_latest(mngr: jc.CheckpointManager) -> int:
    latest = mngr.latest_step
    out = mngr.restore(target=target())
    check(out, out["step"])
    report("restored", latest=latest, step=out["step"], local=mngr._local.steps)
    return out["step"]


def scenario_resume() -> None:
    """Restores step 30 from what survived, trains on to 50 (both tiers rotate), then process 1
    is killed in the middle of writing its part of local step 55."""
    mngr = manager()
    step = restore_latest(mngr)
    train(mngr, step + 1, 50)
    mngr.wait_until_finished()
    report("rotated", steps=mngr.steps, local=mngr._local.steps, latest=mngr.latest_step)
    if PID_ == 1:
        real = _write.write_arrays

        def write_then_die(root, arrays, packs, budget):
            real(root, arrays, packs, budget)
            if "ckpt-55" in root:
                with open(DEAD, "w") as f:
                    f.write("now")
                os.kill(os.getpid(), signal.SIGKILL)

        _write.write_arrays = write_then_die
    train(mngr, 51, 55)
    end_job(victim=1)


def scenario_again(preempt: bool = False) -> None:
    """A restart restores the newest local step that survived whole, and saves on; with
    ``preempt``, process 1 then gets SIGTERM and every process saves the step both tiers."""
    mngr = manager()
    step = restore_latest(mngr)
    on_disk = sorted(os.listdir(LOCAL))
    train(mngr, step + 1, 60)
    mngr.close()
    report("saved-on", steps=mngr.steps, local=mngr._local.steps, at_start=on_disk)
    # Onto another mesh (the devices in another order): the local tier cannot serve it, so
    # step 60 comes from the persistent tier, and the local steps stay.
    other = jax.sharding.Mesh(np.array(jax.devices()[::-1]).reshape(-1, 2), ("x", "y"))
    elsewhere = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other, x.sharding.spec))
            if isinstance(x, jax.ShapeDtypeStruct)
            else x
        ),
        target(),
    )
    out = mngr.restore(target=elsewhere)
    check(out, 60)
    report("other-mesh", step=out["step"], local=mngr._local.steps)
    if preempt:
        for step in range(61, 300):
            if PID_ == 1 and step == 62:
                os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier catches it
            preempted = mngr.reached_preemption(step)
            mngr.save(step, state(step), force=preempted)
            if preempted:
                mngr.wait_until_finished()
                report("preempted", step=step, steps=mngr.steps, local=mngr._local.steps)
                return
            _multihost.barrier(f"train-step-{step}", timeout=30)
            time.sleep(0.02)
        raise AssertionError("no preemption sync point was reached")


SCENARIOS = {"first": scenario_first, "resume": scenario_resume, "again": scenario_again}
SCENARIOS["again-preempt"] = lambda: scenario_again(preempt=True)
SCENARIOS[SCENARIO]()
_multihost.barrier("worker-done", timeout=60)
report("done")
