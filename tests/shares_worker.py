"""One process of a job whose processes share the writing and reading of replicated arrays,
started by tests/checkpoint/test_shares.py.

Usage: ``python shares_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT DIRECTORY``. Every
process has 1 CPU device; the tree is mostly replicated over all of them. Chunks are made small
(``CHUNK_BYTES``) so that a small tree has as many chunks as a large one. Each process reports
the bytes of the chunk files it wrote and the bytes it asked the storage for, as JSON lines in
``$MULTIHOST_RESULTS`` (see tests/multihost_worker.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

SCENARIO, PID, NPROC, PORT, DIRECTORY = sys.argv[1:6]
PID_, NPROC_ = int(PID), int(NPROC)

jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{PORT}",
    num_processes=NPROC_,
    process_id=PID_,
    initialization_timeout=60,
)

import jaxckpt as jc  # noqa: E402
from jaxckpt.checkpoint import broadcast as _broadcast  # noqa: E402
from jaxckpt.checkpoint import multihost as _multihost  # noqa: E402
from jaxckpt.checkpoint import reader as _reader  # noqa: E402
from jaxckpt.checkpoint import shares as _shares  # noqa: E402
from jaxckpt.errors import CorruptCheckpointError  # noqa: E402
from jaxckpt.storage import arrays as _arrays  # noqa: E402
from jaxckpt.storage import chunk_files as _chunks  # noqa: E402

_arrays.CHUNK_BYTES = 256 << 10  # a 512 KiB replicated array: 8 chunks over 4 processes
_shares.MIN_CHUNK = 16 << 10
_broadcast.MIN_BYTES = 16 << 10

SHAPES = {"big": (512, 256), "mid": (100, 40), "bf": (256, 64), "sharded": (8, 1024)}


def value(name: str) -> np.ndarray:
    """What the leaf ``name`` holds, known to every process and to the test."""
    if name.startswith("vec"):
        return np.arange(4096, dtype=np.float32) * 0.25 + int(name[3:])
    dtype = jnp.bfloat16 if name == "bf" else np.float32
    shape = SHAPES[name]
    return (np.arange(int(np.prod(shape))).reshape(shape) % 1000 * 0.5 - len(name)).astype(dtype)


NAMES = ["big", "mid", "bf", "sharded", *(f"vec{i}" for i in range(8))]


def sharding(name: str) -> NamedSharding:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("p",))
    return NamedSharding(mesh, P("p") if name == "sharded" else P())


def make_tree() -> dict:
    tree = {}
    for name in NAMES:
        v = value(name)
        tree[name] = jax.make_array_from_callback(v.shape, sharding(name), lambda i, v=v: v[i])
    tree["host"] = np.full(5, PID_, np.int32)  # process-local: process 0's is saved
    return tree


def report(check: str, **fields) -> None:
    line = json.dumps({"check": check, "process": PID_, **fields})
    print("RESULT " + line, flush=True)
    with open(os.environ["MULTIHOST_RESULTS"], "a") as f:
        f.write(line + "\n")


@contextlib.contextmanager
def count_writes():
    """The bytes of the chunk files this process writes (one dict, filled in)."""
    wrote = {"bytes": 0, "files": 0}
    real = _chunks.write_chunk

    def counting(path, data):
        wrote["bytes"] += data.nbytes
        wrote["files"] += 1
        return real(path, data)

    _chunks.write_chunk = counting
    try:
        yield wrote
    finally:
        _chunks.write_chunk = real


@contextlib.contextmanager
def count_reads():
    """The bytes this process asks the storage for, per leaf (one dict, filled in)."""
    read: dict[str, int] = {}
    real = _reader.Reader.read_many

    def counting(self, requests, then=None):
        for path, index in requests:
            rec = self.record(path)
            whole = np.empty(rec["shape"], np.bool_)
            n = whole[index].size if index is not None else whole.size
            read[path] = read.get(path, 0) + n * np.dtype(rec["dtype"]).itemsize
        return real(self, requests, then)

    _reader.Reader.read_many = counting
    try:
        yield read
    finally:
        _reader.Reader.read_many = real


def check(out: dict, target: dict) -> None:
    for name in NAMES:
        got, want = out[name], target[name]
        if isinstance(want, np.ndarray):
            assert type(got) is np.ndarray
            np.testing.assert_array_equal(got, value(name).astype(np.float32))
            continue
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), name
        for s in got.addressable_shards:
            assert s.data.dtype == value(name).dtype
            np.testing.assert_array_equal(np.asarray(s.data), value(name)[s.index])
    np.testing.assert_array_equal(out["host"], np.zeros(5, np.int32))


def target(numpy: bool = False) -> dict:
    t = {
        n: jax.ShapeDtypeStruct(SHAPES.get(n, (4096,)), value(n).dtype, sharding=sharding(n))
        for n in NAMES
    }
    if numpy:  # every process the whole array, as NumPy
        t.update({n: np.zeros(SHAPES.get(n, (4096,)), np.float32) for n in NAMES if n != "sharded"})
    t["host"] = np.zeros(5, np.int32)
    return t


def scenario_shares() -> None:
    tree = make_tree()
    for mode in ("1", "0"):  # replicas share the writing; then as before, for comparison
        os.environ[_shares.ENV] = mode
        pieces = {a.loc: len(a.pieces) for a in jc.checkpoint.plan.plan(tree)[1]}
        with count_writes() as wrote:
            jc.save(os.path.join(DIRECTORY, f"ckpt-{mode}"), tree)
        report(f"wrote-{mode}", pieces=pieces, **wrote)
    os.environ.pop(_shares.ENV)
    # An async save snapshots only this process's share (chunks cut out of the shards).
    with count_writes() as wrote:
        jc.save_async(os.path.join(DIRECTORY, "ckpt-async"), tree).wait(60)
    report("wrote-async", **wrote)
    check(jc.restore(os.path.join(DIRECTORY, "ckpt-async"), target()), target())
    ckpt = os.path.join(DIRECTORY, "ckpt-1")
    for mode in ("1", "0"):  # read once and broadcast; then every process reads all
        os.environ[_broadcast.ENV] = mode
        for numpy in (False, True):
            t = target(numpy)
            with count_reads() as read:
                out = jc.restore(ckpt, t)
            check(out, t)
            report(f"read-{mode}" + ("-numpy" if numpy else ""), read=read)
    # One process fails to read its share: every process raises, none waits.
    os.environ[_broadcast.ENV] = "1"
    real = _reader.Reader.read_many

    def failing(self, requests, then=None):
        if any(p == "big" and i is not None for p, i in requests):
            raise CorruptCheckpointError("a chunk of big fails its checksum (injected)")
        return real(self, requests, then)

    if PID_ == 1:
        _reader.Reader.read_many = failing
    try:
        jc.restore(ckpt, target())
    except Exception as e:
        report("read-fails", error=type(e).__name__, message=str(e))
    else:
        report("read-fails", error=None)
    _reader.Reader.read_many = real


SCENARIOS = {"shares": scenario_shares}
SCENARIOS[SCENARIO]()
_multihost.barrier("worker-done", timeout=60)
report("done")
