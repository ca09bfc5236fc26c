"""All-zero chunks are not written: the leaf record lists them as ``"zero_chunks"``.

Round trips stay bit-exact (``-0.0`` and NaN are not zero), zarr-python and TensorStore read
the absent chunks as the fill value with no jaxckpt code, and a missing chunk the record does
not list is still damage.
"""

from __future__ import annotations

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr
from core_helpers import assert_tree_equal, files_under
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxckpt as jc
from jaxckpt import memory as _memory
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.checkpoint import snapshot as _snapshot
from jaxckpt.storage import chunk_files as _chunks
from jaxckpt.tools import scan as _scan
from jaxckpt.tools.cli import main

P = PartitionSpec
DTYPES = [np.bool_, np.int8, np.uint32, np.float16, ml_dtypes.bfloat16, np.float32, np.complex64]


def _save(kind, path, tree):
    return jc.save(path, tree) if kind == "sync" else jc.save_async(path, tree).wait()


def _records(path):
    with open(os.path.join(path, "zarr.json")) as f:
        tree = json.load(f)["attributes"]["jaxckpt"]["tree"]
    return {p: rec for p, rec in jc.format.metadata.iter_leaves(tree)}


def _chunk_files(path, leaf):
    return sorted(f for f in files_under(os.path.join(path, leaf)) if f != "zarr.json")


def _not_zero(dtype, shape=(3, 5)):
    """Arrays whose bytes are not all zero although they compare equal to zero (or are NaN)."""
    dtype = np.dtype(dtype)
    out = {}
    if dtype.kind in "fc" or dtype == ml_dtypes.bfloat16:
        out["neg_zero"] = np.full(shape, -0.0, dtype)
        late = np.zeros(1000, dtype)  # zero past the first 64 bytes the check looks at first
        late[-1] = -0.0
        out["late_neg_zero"] = late
        out["nan"] = np.full(shape, np.nan, dtype)
    if dtype.kind == "c":
        out["neg_zero_imag"] = np.full(shape, complex(0.0, -0.0), dtype)
    return out


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_all_zero_arrays_have_no_chunk_files_and_round_trip(tmp_path, dtype, kind):
    tree = {
        "zero": np.zeros((3, 5), dtype),
        "scalar": np.zeros((), dtype),
        "dev": jnp.zeros((4, 6), dtype),
        "empty": np.zeros((0, 3), dtype),
        "one": np.ones((2,), dtype),
        **_not_zero(dtype),
    }
    path = _save(kind, tmp_path / "ckpt", tree)
    recs = _records(path)
    for leaf in ("zero", "scalar", "dev"):
        assert recs[leaf]["zero_chunks"] == "all", leaf
        assert _chunk_files(path, leaf) == [], leaf
    for leaf in set(tree) - {"zero", "scalar", "dev"}:
        assert "zero_chunks" not in recs[leaf], leaf
        one = [_chunks.chunk_key((0,) * tree[leaf].ndim)]
        assert _chunk_files(path, leaf) == ([] if leaf == "empty" else one), leaf
    assert_tree_equal(jc.restore(path), jax.tree_util.tree_map(np.asarray, tree))
    assert_tree_equal(jc.restore(path, tree), tree)


def _sharded(spec, mesh_shape, names):
    devices = np.array(jax.devices()[: int(np.prod(mesh_shape))]).reshape(mesh_shape)
    return NamedSharding(Mesh(devices, names), spec)


def _partly_zero():
    """(8, 16) float32 in 8 chunks of (2, 8) (grid 4 x 2): chunks (1, 1) and (3, 0) are zero,
    chunk (2, 1) holds only -0.0."""
    x = np.arange(1, 8 * 16 + 1, dtype=np.float32).reshape(8, 16)
    x[2:4, 8:16] = 0
    x[6:8, 0:8] = 0
    x[4:6, 8:16] = -0.0
    return x


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_partly_zero_sharded_array_lists_its_zero_chunks(tmp_path, kind):
    x = _partly_zero()
    s = _sharded(P("x", "y"), (4, 2), ("x", "y"))
    path = _save(kind, tmp_path / "ckpt", {"x": jax.device_put(x, s), "y": np.float32(1)})
    rec = _records(path)["x"]
    assert rec["chunks"] == [2, 8]
    assert rec["zero_chunks"] == [3, 6]  # flat indices in C order over the 4 x 2 chunk grid
    want = [f"c/{i}/{j}" for i in range(4) for j in range(2) if (i, j) not in ((1, 1), (3, 0))]
    assert _chunk_files(path, "x") == want

    # Whole, into shardings (TensorStore reads each shard), and sliced across zero chunks.
    assert_tree_equal(jc.restore(path)["x"], x)
    for spec, mesh_shape, names in [(P("x"), (8,), ("x",)), (P(None, "x"), (2,), ("x",))]:
        t = _sharded(spec, mesh_shape, names)
        out = jc.restore(
            path, {"x": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=t)}, partial=True
        )
        assert out["x"].sharding == t
        assert_tree_equal(np.asarray(out["x"]), x)
        for shard in out["x"].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
    reader = jc.open(path)
    for index in [(slice(1, 7), slice(5, 12)), (slice(6, 8),), (3, slice(None)), (slice(2, 4),)]:
        assert_tree_equal(reader.read("x", index), x[index])


def test_numpy_array_with_several_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(jc.storage.arrays, "CHUNK_BYTES", 4096)  # 1024 float32 rows per chunk
    x = np.zeros((8, 1024), np.float32)
    x[5] = np.arange(1024)
    path = jc.save(tmp_path / "ckpt", {"x": x})
    rec = _records(path)["x"]
    assert rec["chunks"] == [1, 1024] and rec["zero_chunks"] == [0, 1, 2, 3, 4, 6, 7]
    assert _chunk_files(path, "x") == ["c/5/0"]
    assert_tree_equal(jc.restore(path)["x"], x)
    assert_tree_equal(jc.open(path).read("x", (slice(4, 7),)), x[4:7])


def test_zarr_python_and_tensorstore_read_absent_chunks_as_zero(tmp_path):
    x = _partly_zero()
    s = _sharded(P("x", "y"), (4, 2), ("x", "y"))
    zeros = np.zeros((3, 4), ml_dtypes.bfloat16)  # stored as uint16
    path = jc.save(
        tmp_path / "ckpt", {"x": jax.device_put(x, s), "z": zeros, "b": np.zeros(3, bool)}
    )
    group = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(group["x"][...], x)
    np.testing.assert_array_equal(group["x"][...].view(np.uint32), x.view(np.uint32))  # -0.0
    np.testing.assert_array_equal(group["z"][...], np.zeros((3, 4), np.uint16))
    np.testing.assert_array_equal(group["b"][...], np.zeros(3, bool))
    store = ts.open({"driver": "zarr3", "kvstore": f"file://{path}/x/"}).result()
    np.testing.assert_array_equal(store.read().result().view(np.uint32), x.view(np.uint32))


def test_deleting_an_unlisted_chunk_is_still_damage(tmp_path, monkeypatch, capsys):
    x = _partly_zero()
    s = _sharded(P("x", "y"), (4, 2), ("x", "y"))
    z = np.zeros((4, 4), np.float32)
    tree = {"x": jax.device_put(x, s), "z": z}
    path = jc.save(tmp_path / "ckpt", tree)
    assert main(["verify", "-q", path]) == 0
    assert "OK: " in capsys.readouterr().out

    os.remove(os.path.join(path, "x", "c", "0", "0"))
    missing = rf"Reading the array 'x' .*chunk file {re.escape(path)}/x/c/0/0 is missing"
    with pytest.raises(jc.CorruptCheckpointError, match=missing):
        jc.restore(path)
    # Through TensorStore (a slice, a sharded target): even a slice of zero chunks only.
    with pytest.raises(jc.CorruptCheckpointError, match=missing):
        jc.open(path).read("x", (slice(2, 4), slice(8, 16)))
    t = _sharded(P("x"), (8,), ("x",))
    with pytest.raises(jc.CorruptCheckpointError, match=missing):
        jc.restore(path, {"x": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=t), "z": z})
    assert_tree_equal(jc.open(path)["z"], z)

    for block in (None, 64):  # whole arrays, then "x" in blocks read through TensorStore
        if block:
            monkeypatch.setattr(_scan, "BLOCK_BYTES", block)
        assert main(["verify", "-q", path]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("DAMAGED x: ") and f"{path}/x/c/0/0 is missing" in lines[0]
        assert lines[1].startswith(f"1 of 2 arrays in {path} are damaged.")


def test_async_snapshot_keeps_no_copy_of_a_zero_piece_and_is_donation_safe(tmp_path):
    s = _sharded(P("x"), (8,), ("x",))
    x = np.zeros((8, 16), np.float32)
    x[0] = 1  # one shard is not zero
    params = {"w": jax.device_put(x, s), "b": jnp.zeros(7, jnp.bfloat16)}
    host = {"big": np.zeros(300_000, np.int32), "data": np.arange(10, dtype=np.int8)}
    tree = {"params": params, "host": host}
    expected = jax.tree_util.tree_map(np.array, tree)

    _, arrays, packs = _plan.plan(tree)
    full = _snapshot.snapshot_bytes(arrays, packs)
    _snapshot.snapshot(arrays, packs)
    kept = [p for a in arrays for p in a.pieces if not isinstance(p.data, _memory.Zeros)]
    assert len(kept) == 2  # the shard with a 1 and the int8 range: nothing else is copied
    assert _snapshot.snapshot_bytes(arrays, packs) == 64 + 10 < full

    @functools.partial(jax.jit, donate_argnums=0)
    def step(p):
        return jax.tree_util.tree_map(lambda v: v + 1, p)

    h = jc.save_async(tmp_path / "ckpt", tree)
    params = step(params)  # donates the buffers the save was given
    host["big"][:] = 7  # in-place mutation of the caller's NumPy arrays
    host["data"][:] = 0
    assert_tree_equal(jc.restore(h.wait()), expected)
    assert jc.runtime.held_bytes() == 0
    assert _records(h.path)["host/big"]["zero_chunks"] == "all"
    assert _records(h.path)["params/w"]["zero_chunks"] == [1, 2, 3, 4, 5, 6, 7]


def test_pieces_written_through_tensorstore_keep_every_chunk(tmp_path, monkeypatch):
    """A piece that does not cover whole chunks goes through TensorStore, which writes every
    chunk of that array, zeros included: its record lists none."""
    real = _plan._pieces

    def uneven(x):
        if np.shape(x) != (8, 16):
            return real(x)
        rows = [(0, 4), (4, 6), (6, 8)]  # chunks of 4 rows: the last two pieces cut a chunk
        cut = [_plan.Piece((slice(a, b), slice(0, 16)), x[a:b], x[a:b].nbytes) for a, b in rows]
        return cut, (4, 16)

    monkeypatch.setattr(_plan, "_pieces", uneven)
    path = jc.save(tmp_path / "ckpt", {"x": np.zeros((8, 16), np.float32)})
    assert "zero_chunks" not in _records(path)["x"]
    assert _chunk_files(path, "x") == ["c/0/0", "c/1/0"]
    assert_tree_equal(jc.restore(path)["x"], np.zeros((8, 16), np.float32))


def test_packs_keep_every_chunk(tmp_path):
    tree = {f"leaf{i}": np.zeros(10, np.float32) for i in range(64)}
    path = jc.save(tmp_path / "ckpt", tree)
    recs = _records(path)
    assert all("packed" in r and "zero_chunks" not in r for r in recs.values())
    assert _chunk_files(path, "~pack/0") == ["c/0"]
    assert_tree_equal(jc.restore(path), tree)
