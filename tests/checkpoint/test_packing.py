"""Small leaves packed into shared zarr arrays; large ones written chunk file by chunk file."""

import gc
import json
import os
import shutil
import threading
import time

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
import zarr
from core_helpers import edit_metadata, rewrite_metadata

import jaxckpt as jc
from jaxckpt import memory as _memory
from jaxckpt import runtime as _runtime
from jaxckpt.checkpoint import match as _match
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.checkpoint import save_steps as _steps
from jaxckpt.checkpoint import write as _write
from jaxckpt.format import metadata as _metadata
from jaxckpt.storage import chunk_files as _chunks


@pytest.fixture(autouse=True)
def _pack_even_small_trees(monkeypatch):
    """These tests use a few leaves; packing starts at PACK_MIN_LEAVES small ones otherwise."""
    monkeypatch.setattr(_plan, "PACK_MIN_LEAVES", 1)


DTYPES = ["float32", "bfloat16", "float16", "int8", "uint32", "bool", "complex64"]


def _small_tree():
    rng = np.random.default_rng(0)
    tree = {}
    for i, name in enumerate(DTYPES):
        dt = jnp.dtype(name)
        for shape in [(), (0,), (3, 5), (17,)]:
            raw = rng.integers(0, 255, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
            arr = raw.view(np.uint8 if name == "bool" else dt).reshape(shape)
            if name == "bool":
                arr = arr % 2 == 1
            tree[f"{name}{i}_{len(shape)}_{shape[0] if shape else 's'}"] = arr
    tree["jax"] = {"b": jnp.arange(7, dtype=jnp.int32), "scalar": np.float32(2.5)}
    tree["big"] = np.arange(300_000, dtype=np.float32).reshape(600, 500)  # 1.2 MB: own path
    return tree


def _assert_same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leaf_records(path):
    meta = json.load(open(os.path.join(path, "zarr.json")))["attributes"]["jaxckpt"]
    return dict(jc.format.metadata.iter_leaves(meta["tree"]))


def test_small_leaves_share_one_array_and_round_trip(tmp_path):
    tree = _small_tree()
    path = jc.save(tmp_path / "ckpt", tree)
    _assert_same(jc.restore(path), tree)
    _assert_same(jc.restore(path, tree), tree)
    # Only the big array and the pack have their own zarr array directories.
    arrays = sorted(
        os.path.relpath(d, path)
        for d, _, files in os.walk(path)
        if "zarr.json" in files
        and json.load(open(os.path.join(d, "zarr.json")))["node_type"] == "array"
    )
    assert arrays == ["big", "~pack/0"]
    np.testing.assert_array_equal(
        zarr.open_array(os.path.join(path, "big"), mode="r")[:], tree["big"]
    )


def test_every_packed_leaf_is_readable_by_tensorstore_from_the_metadata(tmp_path):
    tree = _small_tree()
    path = jc.save(tmp_path / "ckpt", tree)
    for p, rec in _leaf_records(path).items():
        if "packed" not in rec:
            continue
        store = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{rec['loc']}/"}}
        ).result()
        off, n, chunk = rec["packed"]
        assert (chunk,) == tuple(store.chunk_layout.read_chunk.shape)
        raw = store[off : off + n].read().result()
        got = raw.view(np.dtype(rec["dtype"])).reshape(rec["shape"])
        np.testing.assert_array_equal(got, jc.open(path)[p])
        assert got.dtype == jc.open(path)[p].dtype


def test_leaves_straddling_chunks_and_several_packs(tmp_path, monkeypatch):
    monkeypatch.setattr(_plan, "PACK_CHUNK", 100)
    monkeypatch.setattr(_plan, "PACK_MAX", 1000)
    tree = {f"k{i}": np.arange(i * 7, dtype=np.float32) for i in range(40)}
    path = jc.save(tmp_path / "ckpt", tree)
    locs = {r["loc"] for r in _leaf_records(path).values()}
    assert len(locs) > 3
    assert sorted(os.listdir(os.path.join(path, "~pack"))) == sorted(
        [*(loc[6:] for loc in locs), "zarr.json"]
    )
    _assert_same(jc.restore(path), tree)
    reader = jc.open(path)
    np.testing.assert_array_equal(reader["k33"], tree["k33"])
    np.testing.assert_array_equal(reader.read("k33", (slice(5, 40),)), tree["k33"][5:40])
    np.testing.assert_array_equal(
        zarr.open_array(os.path.join(path, "~pack/0"), mode="r")[:28], tree["k1"].view(np.uint8)
    )
    assert "k0" in jc.open(path) and jc.open(path)["k0"].shape == (0,)


def test_partial_restore_reads_only_the_chunks_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(_plan, "PACK_CHUNK", 256)
    tree = {"a": np.arange(64, dtype=np.float32), "b": np.arange(64, 128, dtype=np.float32)}
    path = jc.save(tmp_path / "ckpt", tree)
    # "b" lives in chunk 1 only; damage chunk 0 (which holds "a").
    chunk0 = os.path.join(path, "~pack/0/c/0")
    data = bytearray(open(chunk0, "rb").read())
    data[3] ^= 1
    open(chunk0, "wb").write(bytes(data))
    out = jc.restore(path, {"b": np.zeros(64, np.float32)}, partial=True)
    np.testing.assert_array_equal(out["b"], tree["b"])
    np.testing.assert_array_equal(jc.open(path)["b"], tree["b"])
    with pytest.raises(
        jc.CorruptCheckpointError, match=r"Reading the array 'a' .* fails its crc32c checksum"
    ):
        jc.open(path)["a"]


def test_one_packed_leaf_is_read_alone_and_checked_against_its_own_crc(tmp_path, monkeypatch):
    monkeypatch.setattr(_plan, "PACK_CHUNK", 4096)
    tree = {f"k{i}": np.arange(100, dtype=np.float32) + i for i in range(40)}  # 400 B each
    tree["empty"] = np.zeros(0, np.float32)  # no bytes, no crc32c
    path = jc.save(tmp_path / "ckpt", tree)
    recs = _leaf_records(path)
    assert "crc32c" not in recs.pop("empty")
    assert all(r["crc32c"] == google_crc32c.value(tree[n].tobytes()) for n, r in recs.items())
    straddler = next(
        n for n, r in recs.items() if r["packed"][0] // 4096 != (sum(r["packed"][:2]) - 1) // 4096
    )
    with monkeypatch.context() as m:  # a few leaves: only their bytes are read, no whole chunk
        m.setattr(_chunks, "read_chunk_into", lambda *a: pytest.fail("read a whole chunk"))
        for name in ("k3", straddler):
            np.testing.assert_array_equal(jc.open(path)[name], tree[name])
            got = jc.restore(path, {name: np.zeros(100, np.float32)}, partial=True)
            np.testing.assert_array_equal(got[name], tree[name])
        want = {"k3": np.zeros(100, np.float32), "empty": np.zeros(0, np.float32)}
        got = jc.restore(path, want, partial=True)
        assert got["k3"].tolist() == tree["k3"].tolist() and got["empty"].shape == (0,)
    offset = recs["k3"]["packed"][0]
    chunk = os.path.join(path, "~pack/0/c", str(offset // 4096))
    data = bytearray(open(chunk, "rb").read())
    data[offset % 4096 + 5] ^= 1
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(jc.CorruptCheckpointError, match=r"Reading the array 'k3' .* crc32c"):
        jc.open(path)["k3"]
    several = {n: np.zeros(100, np.float32) for n in ("k12", "k3", "k5")}  # 3 chunks
    with pytest.raises(jc.CorruptCheckpointError, match=r"Reading the array 'k3' .* crc32c"):
        jc.restore(path, several, partial=True)  # the damaged leaf named, not its pack
    np.testing.assert_array_equal(jc.open(path)["k4"], tree["k4"])  # same chunk, intact leaf
    with pytest.raises(jc.CorruptCheckpointError, match="crc32c"):
        jc.restore(path)  # whole chunks: the chunk's own checksum


def test_packed_leaves_without_their_own_crc_are_read_by_chunk(tmp_path, monkeypatch):
    """Checkpoints written before packed leaves had a ``crc32c`` still read (whole chunks)."""
    monkeypatch.setattr(_plan, "PACK_CHUNK", 4096)
    tree = {f"k{i}": np.arange(100, dtype=np.float32) + i for i in range(40)}
    path = jc.save(tmp_path / "ckpt", tree)

    def drop_crcs(doc):
        for _, rec in jc.format.metadata.iter_leaves(doc["attributes"]["jaxckpt"]["tree"]):
            del rec["crc32c"]

    edit_metadata(path, "zarr.json", drop_crcs)
    read = []
    real = _chunks.read_chunk_into
    monkeypatch.setattr(_chunks, "read_chunk_into", lambda *a: read.append(a[0]) or real(*a))
    np.testing.assert_array_equal(jc.open(path)["k3"], tree["k3"])
    offset = _leaf_records(path)["k3"]["packed"][0]  # 400 B inside one 4 KiB chunk
    assert read == [os.path.join(path, "~pack/0/c", str(offset // 4096))]


def test_damaged_or_missing_chunk_of_a_large_array_is_reported(tmp_path):
    tree = {"big": np.ones((512, 1024), np.float32)}
    path = jc.save(tmp_path / "ckpt", tree)
    chunk = os.path.join(path, "big/c/0/0")
    data = bytearray(open(chunk, "rb").read())
    data[100] ^= 1
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(
        jc.CorruptCheckpointError, match=r"'big' .* fails its crc32c checksum.*jaxckpt verify"
    ):
        jc.restore(path)
    os.remove(chunk)
    with pytest.raises(jc.CorruptCheckpointError, match=r"'big' .*chunk file .* is missing"):
        jc.open(path)["big"]


def test_chunk_files_match_tensorstore_both_ways(tmp_path, monkeypatch):
    # Cut into several chunks along two axes, and read back with TensorStore and zarr-python.
    monkeypatch.setattr(jc.storage.arrays, "CHUNK_BYTES", 64 << 10)
    x = np.random.default_rng(1).standard_normal((256, 1200)).astype(np.float32)
    path = jc.save(tmp_path / "ckpt", {"x": x})
    assert len(os.listdir(os.path.join(path, "x/c"))) > 1
    np.testing.assert_array_equal(zarr.open_array(os.path.join(path, "x"), mode="r")[:], x)
    np.testing.assert_array_equal(
        jc.open(path).read("x", (slice(3, 200), slice(7, 1100))), x[3:200, 7:1100]
    )
    # An array TensorStore wrote, with padded edge chunks, read by the direct reader.
    meta = jc.storage.arrays.array_metadata([10, 7], "int16", [4, 3])
    y = np.arange(70, dtype=np.int16).reshape(10, 7)
    jc.storage.at(str(tmp_path)).open_array("y", meta, create=True).result().write(y).result()
    np.testing.assert_array_equal(
        _chunks.read_whole(str(tmp_path), "y", [10, 7], [4, 3], np.dtype("int16")), y
    )


def test_sharded_arrays_round_trip(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    big = jax.device_put(np.arange(512 * 1024, dtype=np.float32).reshape(512, 1024), spec)
    small = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8), spec)
    path = jc.save(tmp_path / "ckpt", {"big": big, "small": small})
    assert len(os.listdir(os.path.join(path, "big/c"))) == 4
    out = jc.restore(path, {"big": big, "small": small})
    assert out["big"].sharding == spec
    _assert_same(out, {"big": big, "small": small})


def test_restored_arrays_are_aligned_for_zero_copy(tmp_path):
    path = jc.save(
        tmp_path / "ckpt", {"big": np.ones((512, 1024), np.float32), "s": np.ones(3, np.int8)}
    )
    out = jc.restore(path)
    assert out["big"].ctypes.data % _memory.ALIGN == 0
    assert out["s"].ctypes.data % _memory.ALIGN == 0


def test_unpacked_zero_d_arrays_read_back_their_value(tmp_path, monkeypatch):
    """0-d arrays at their own path (multi-process saves never pack) keep their value."""
    monkeypatch.setattr(_plan, "PACK_BELOW", 0)
    tree = {"z": np.float32(7), "q": np.array(3.0), "i": np.array(-5, np.int8)}
    path = jc.save(tmp_path / "c", tree)
    assert jc.open(path).record("q")["loc"] == "q"
    zeros = {"z": np.float32(0), "q": np.array(0.0), "i": np.array(0, np.int8)}
    for out in (jc.restore(path), jc.restore(path, zeros)):
        assert out == tree


def test_small_trees_keep_a_zarr_array_per_leaf_and_many_small_leaves_are_packed(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_plan, "PACK_MIN_LEAVES", 64)
    few = {f"l{i}": np.full(3, i, np.float32) for i in range(63)}
    path = jc.save(tmp_path / "few", few)
    assert not os.path.exists(os.path.join(path, "~pack"))
    np.testing.assert_array_equal(zarr.open_group(path, mode="r")["l5"][:], few["l5"])
    many = {**few, "l63": np.full(3, 63, np.float32)}
    path = jc.save(tmp_path / "many", many)
    assert os.path.exists(os.path.join(path, "~pack"))
    assert not os.path.exists(os.path.join(path, "l5"))
    out = jc.restore(path)
    assert out.keys() == many.keys()
    for k in many:
        np.testing.assert_array_equal(out[k], many[k])


def test_a_synchronous_save_builds_few_pack_chunks_ahead_of_the_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(_plan, "PACK_CHUNK", 256)
    monkeypatch.setattr(_write, "PACK_FLIGHT", 4 * 256)
    built, written, ahead, lock = [0], [0], [], threading.Lock()
    chunk, write_chunk = _plan.Pack.chunk, _chunks.write_chunk

    def counting_chunk(self, k, taken=None):
        built[0] += 1
        ahead.append(built[0] - written[0])
        return chunk(self, k, taken)

    def slow_write_chunk(path, data):
        time.sleep(0.002)  # a slow disk: the builder would run far ahead if it were not held
        write_chunk(path, data)
        with lock:
            written[0] += 1

    monkeypatch.setattr(_plan.Pack, "chunk", counting_chunk)
    monkeypatch.setattr(_chunks, "write_chunk", slow_write_chunk)
    tree = {f"k{i}": np.full(60, i, np.float32) for i in range(100)}  # 240 B each: ~100 chunks
    path = jc.save(tmp_path / "ckpt", tree)
    assert built[0] >= 90 and written[0] == built[0]
    assert max(ahead) <= 4 + 1  # PACK_FLIGHT / PACK_CHUNK chunks in flight, and the one built
    _assert_same(jc.restore(path), tree)


def test_planning_pauses_the_garbage_collector_and_restores_it(tmp_path):
    seen = []
    tree = {"a": np.zeros(3), "b": {"c": np.ones(2)}}

    def record(path, x):
        seen.append(gc.isenabled())
        return {"t": "array"}

    assert gc.isenabled()
    _metadata.describe(tree, record)
    assert seen == [False, False] and gc.isenabled()

    def broken(path, x):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        _metadata.describe(tree, broken)
    assert gc.isenabled()
    gc.disable()
    try:
        _metadata.describe(tree, record)
        assert not gc.isenabled()  # a caller's own pause is left alone
    finally:
        gc.enable()
    _assert_same(jc.restore(jc.save(tmp_path / "ckpt", tree)), tree)


def test_a_pack_s_gaps_and_tail_are_zeros_whatever_memory_it_is_built_in(tmp_path, monkeypatch):
    # np.empty and the pooled buffers may hand out any bytes: the leaves' 64-byte alignment
    # gaps and the last chunk's tail must still be written as zeros, by both kinds of save
    # (an incremental save compares chunk files, and a pack's bytes are its checksums').
    monkeypatch.setattr(_plan, "PACK_CHUNK", 256)
    real_empty, real_take = np.empty, _runtime.take_buffer

    def dirty_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        out.view(np.uint8).reshape(-1)[:] = 0xAB
        return out

    def dirty_take(nbytes):
        out = real_take(nbytes)
        out[:] = 0xAB
        return out

    monkeypatch.setattr(np, "empty", dirty_empty)
    monkeypatch.setattr(_runtime, "take_buffer", dirty_take)
    tree = {f"k{i}": np.full(i * 3 + 1, i + 1, np.int8) for i in range(40)}
    paths = [jc.save(tmp_path / "sync", tree), jc.save_async(tmp_path / "async", tree).wait()]
    for path in paths:
        packed = np.zeros(0, np.uint8)
        for k in range(len(os.listdir(os.path.join(path, "~pack/0/c")))):
            raw = open(os.path.join(path, "~pack/0/c", str(k)), "rb").read()[:-4]  # the crc
            packed = np.concatenate([packed, np.frombuffer(raw, np.uint8)])
        covered = np.zeros(packed.size, bool)
        for name, rec in _leaf_records(path).items():
            offset, n, _ = rec["packed"]
            np.testing.assert_array_equal(packed[offset : offset + n], tree[name])
            covered[offset : offset + n] = True
        assert not covered.all()  # there are gaps and a tail
        assert not packed[~covered].any()
    _assert_same(jc.restore(paths[0]), tree)


def test_a_synchronous_save_pauses_the_garbage_collector(tmp_path, monkeypatch):
    seen = []
    real = _steps.execute

    def execute(s, budget):
        seen.append(gc.isenabled())
        return real(s, budget)

    monkeypatch.setattr(_steps, "execute", execute)
    jc.save(tmp_path / "ckpt", {"a": np.zeros(3)})
    assert seen == [False] and gc.isenabled()


def _recorded_chunk_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = _chunks.read_chunk_into

    def read(path, out):
        reads.append(path)
        real(path, out)

    monkeypatch.setattr(_chunks, "read_chunk_into", read)
    return reads


def test_a_full_restore_starts_reading_the_packs_before_it_plans(tmp_path, monkeypatch):
    monkeypatch.setattr(_plan, "PACK_CHUNK", 256)
    tree = {f"k{i}": np.arange(50, dtype=np.float32) + i for i in range(20)}  # 20 chunks
    path = jc.save(tmp_path / "ckpt", tree)
    reads = _recorded_chunk_reads(monkeypatch)
    planned_with = []
    real_plan = _match.plan

    def plan(reader, *args, **kw):
        planned_with.append(sorted(reader._prefetched))  # the reads issued by then
        return real_plan(reader, *args, **kw)

    monkeypatch.setattr(_match, "plan", plan)
    _assert_same(jc.restore(path, tree), tree)
    assert planned_with == [["~pack/0"]]
    chunks = sorted(os.listdir(os.path.join(path, "~pack/0/c")), key=int)
    assert sorted(os.path.basename(p) for p in reads) == sorted(chunks)  # each once
    assert len(chunks) > 10


def test_reading_ahead_keeps_to_the_packs_inside_the_checkpoint(tmp_path, monkeypatch):
    # A crafted COMMIT lists a "pack" outside the checkpoint (a loc with ".."): never read.
    tree = {f"k{i}": np.arange(50, dtype=np.float32) + i for i in range(20)}
    ck = str(jc.save(tmp_path / "ckpt", tree))
    os.makedirs(tmp_path / "outside")
    with open(os.path.join(ck, "~pack/0/zarr.json"), "rb") as f:
        rewrite_metadata(ck, "~pack/../../outside/zarr.json", f.read())
    shutil.copytree(os.path.join(ck, "~pack/0/c"), tmp_path / "outside" / "c")
    reads = _recorded_chunk_reads(monkeypatch)
    _assert_same(jc.restore(ck, tree), tree)
    assert reads and not [p for p in reads if "outside" in p]
