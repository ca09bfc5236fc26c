"""One process of a 2-process Orbax save, started by tests/interop/test_orbax_multihost.py.

Usage: ``python orbax_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY``. Each
process has 4 CPU devices; together they save one array sharded over all 8 (each process
writes its own half) and a replicated one, with OCDBT on and off.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

PID, NPROC, PORT, DIRECTORY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{PORT}", NPROC, PID, initialization_timeout=60)
logging.getLogger("absl").setLevel(logging.ERROR)

X = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)  # the test expects these values
mesh = jax.make_mesh((8,), ("d",))
x = jax.make_array_from_callback(X.shape, NamedSharding(mesh, P("d")), lambda i: X[i])
y = jax.make_array_from_callback((3,), NamedSharding(mesh, P()), lambda i: np.ones(3, np.int32)[i])
for ocdbt in (True, False):
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)
    with ocp.Checkpointer(handler) as ck:
        ck.save(
            os.path.join(DIRECTORY, f"ocdbt-{ocdbt}"), args=ocp.args.PyTreeSave({"x": x, "y": y})
        )
print("SAVED", PID, flush=True)
