"""An Orbax checkpoint saved by 2 JAX processes (each writing its own shards), read by
jaxckpt in one process: whole, and onto a mesh."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt as jc

WORKER = os.path.join(os.path.dirname(__file__), "orbax_multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
X = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, directory: str, timeout: float = 120.0, worker: str = WORKER) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(n), str(port), directory],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: killing it reaches nothing else
        )
        for i in range(n)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"the {n} Orbax processes did not finish within {timeout} s")
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]


def test_two_process_orbax_save_read_by_jaxckpt(tmp_path):
    _launch(2, str(tmp_path))
    mesh = jax.make_mesh((8,), ("d",))
    for ocdbt in (True, False):
        path = str(tmp_path / f"ocdbt-{ocdbt}")
        got = jc.restore(path)
        np.testing.assert_array_equal(got["x"], X)
        np.testing.assert_array_equal(got["y"], np.ones(3, np.int32))
        for spec in (P("d"), P()):  # as saved, and replicated: each spans both writers' parts
            target = {
                "x": jax.ShapeDtypeStruct(X.shape, X.dtype, sharding=NamedSharding(mesh, spec)),
                "y": jax.ShapeDtypeStruct((3,), np.int32),
            }
            back = jc.restore(path, target)
            np.testing.assert_array_equal(np.asarray(back["x"]), X)
            assert back["x"].sharding.spec == spec
