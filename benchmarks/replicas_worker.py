"""One process of bench.py's W5: P processes on 127.0.0.1 save and restore a fully replicated
tree (pure data parallelism), with replicas sharing the writing and the reading, and without.

Usage: ``python replicas_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY MIB REPEATS``.
Each process has one CPU device. Every timed operation starts at a barrier and ends when the
slowest process is done (another barrier). Each process prints one JSON line per operation and
repeat: ``W5RESULT {"op": ..., "seconds": ..., "wrote": ..., "read": ...}``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

PID, NPROC, PORT = (int(a) for a in sys.argv[1:4])
DIRECTORY, MIB, REPEATS = sys.argv[4], float(sys.argv[5]), int(sys.argv[6])
jax.distributed.initialize(f"127.0.0.1:{PORT}", NPROC, PID, initialization_timeout=120)

import jaxckpt as jc  # noqa: E402
from jaxckpt.checkpoint import broadcast as _broadcast  # noqa: E402
from jaxckpt.checkpoint import multihost as _multihost  # noqa: E402
from jaxckpt.checkpoint import reader as _reader  # noqa: E402
from jaxckpt.checkpoint import shares as _shares  # noqa: E402
from jaxckpt.storage import chunk_files as _chunks  # noqa: E402


def make_tree() -> dict:
    """Half the bytes in one array, the rest in 8 (a large embedding and layers), replicated."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rep = NamedSharding(mesh, P())
    half = max(1024, int(MIB * (1 << 20) / 2 / 4 / 1024)) * 1024  # float32 elements
    rng = np.random.default_rng(0)
    shapes = {"embed": (half // 1024, 1024), **{f"layer_{i}": (half // 8,) for i in range(8)}}
    out = {}
    for name, shape in shapes.items():
        v = rng.standard_normal(shape, dtype=np.float32)
        out[name] = jax.make_array_from_callback(shape, rep, lambda i, v=v: v[i])
    return out


def target(tree: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for k, x in tree.items()}


counts = {"wrote": 0, "read": 0}
real_write, real_read = _chunks.write_chunk, _reader.Reader.read_many


def write_chunk(path, data):
    counts["wrote"] += data.nbytes
    return real_write(path, data)


def read_many(self, requests, then=None):
    for path, index in requests:
        rec = self.record(path)
        n = np.empty(rec["shape"], np.bool_)[index].size if index is not None else None
        counts["read"] += (n if n is not None else int(np.prod(rec["shape"]))) * 4
    return real_read(self, requests, then)


_chunks.write_chunk = write_chunk
_reader.Reader.read_many = read_many


def timed(op: str, rep: int, fn) -> None:
    counts.update(wrote=0, read=0)
    _multihost.barrier(f"w5-{op}-{rep}-start", timeout=300)
    t = time.perf_counter()
    fn()
    mine = time.perf_counter() - t
    _multihost.barrier(f"w5-{op}-{rep}-end", timeout=300)
    line = {"op": op, "rep": rep, "process": PID, "seconds": time.perf_counter() - t}
    print("W5RESULT " + json.dumps({**line, "own_seconds": mine, **counts}), flush=True)


tree = make_tree()
for rep in range(REPEATS):
    for share in ("1", "0"):  # today's way (0) and replicas sharing (1), in the same run
        os.environ[_shares.ENV] = share
        path = os.path.join(DIRECTORY, f"ckpt-{share}-{rep}")
        timed(f"save_share{share}", rep, lambda path=path: jc.save(path, tree))
    os.environ.pop(_shares.ENV)
    for bcast in ("1", "0"):  # warm: the page cache holds the checkpoint (one machine)
        os.environ[_broadcast.ENV] = bcast
        path = os.path.join(DIRECTORY, f"ckpt-1-{rep}")
        timed(f"restore_bcast{bcast}", rep, lambda path=path: jc.restore(path, target(tree)))
    _multihost.barrier(f"w5-clean-{rep}", timeout=300)
    if PID == 0:
        for share in ("1", "0"):
            shutil.rmtree(os.path.join(DIRECTORY, f"ckpt-{share}-{rep}"))
_multihost.barrier("w5-done", timeout=300)
