"""One process of a 2-process restore of a safetensors file onto a mesh, started by
tests/interop/test_safetensors_multihost.py.

Usage: ``python safetensors_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY``. Each
process has 2 CPU devices. It restores ``DIRECTORY/model.safetensors`` onto a mesh over all 4
devices, sharded on rows, on columns and replicated, counting the bytes of the file it reads,
and writes ``DIRECTORY/result-<PROCESS_ID>.json``: per case, the bytes read and whether every
local shard equals the saved tensor's slice bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy as stn  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxckpt as jc  # noqa: E402
from jaxckpt.interop import safetensors as st  # noqa: E402

PID, NPROC, PORT, DIRECTORY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{PORT}", NPROC, PID, initialization_timeout=60)
logging.getLogger("absl").setLevel(logging.ERROR)

path = os.path.join(DIRECTORY, "model.safetensors")
saved = stn.load_file(path)
read: list[int] = []
real = os.preadv


def counted(fd: int, buffers: list, offset: int) -> int:
    n = real(fd, buffers, offset)
    read.append(n)
    return n


st.os.preadv = counted  # type: ignore[attr-defined]
mesh = jax.make_mesh((4,), ("d",))
results = {}
for case, spec in {"rows": P("d"), "columns": P(None, "d"), "replicated": P()}.items():
    target = {
        k: {"w": jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec))}
        for k, v in (tuple(name.split(".")[:1]) + (saved[name],) for name in saved)
    }
    read.clear()
    got = jc.restore(path, target)
    exact = all(
        np.asarray(shard.data).tobytes()
        == np.ascontiguousarray(saved[f"{k}.w"][shard.index]).tobytes()
        for k in got
        for shard in got[k]["w"].addressable_shards
    )
    results[case] = {"bytes": sum(read), "exact": exact}
with open(os.path.join(DIRECTORY, f"result-{PID}.json"), "w") as f:
    json.dump(results, f)
print("DONE", PID, flush=True)
