"""Sharded arrays in one process with 8 CPU devices: save any sharding, restore onto any other.

Each case saves an array under one sharding and restores it onto another sharding, mesh shape
or device count, into NumPy and into ``ShapeDtypeStruct`` targets; values are compared
bit-exactly and so is every addressable shard of the result against its slice.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

import jaxckpt as jc
from jaxckpt.checkpoint import plan as _plan

P = PartitionSpec
SHAPE = (8, 16)


def mesh(shape: tuple[int, ...], names: tuple[str, ...], devices: list | None = None):
    devs = np.array(devices if devices is not None else jax.devices()[: int(np.prod(shape))])
    return jax.sharding.Mesh(devs.reshape(shape), names)


def sharding(kind: str) -> jax.sharding.Sharding:
    """Named shardings used both to save and as restore targets."""
    m8 = mesh((8,), ("x",))
    m42 = mesh((4, 2), ("x", "y"))
    m24 = mesh((2, 4), ("a", "b"))
    return {
        "1d-rows": NamedSharding(m8, P("x")),
        "1d-cols": NamedSharding(m8, P(None, "x")),
        "2d": NamedSharding(m42, P("x", "y")),
        "2d-transposed": NamedSharding(m24, P("b", "a")),
        "2d-flat": NamedSharding(m42, P(("x", "y"))),
        "partly-replicated": NamedSharding(m42, P("x")),  # 4 shards, each held by 2 devices
        "replicated": NamedSharding(m8, P()),
        "single-device": SingleDeviceSharding(jax.devices()[5]),
        "2-way": NamedSharding(mesh((2,), ("x",), jax.devices()[6:8]), P("x")),
        "2-way-cols": NamedSharding(mesh((2,), ("x",), jax.devices()[2:4]), P(None, "x")),
        "1-device-mesh": NamedSharding(mesh((1,), ("x",), jax.devices()[3:4]), P("x")),
    }[kind]


# distinct shards of each saved sharding over SHAPE (the replicas it must skip)
DISTINCT = {
    "1d-rows": 8, "1d-cols": 8, "2d": 8, "2d-flat": 8, "partly-replicated": 4,
    "replicated": 1, "single-device": 1, "2-way": 2,
}  # fmt: skip
SAVED = sorted(DISTINCT)
TARGETS = [
    "2-way", "2-way-cols", "replicated", "partly-replicated", "2d-transposed", "1d-cols",
    "single-device", "1-device-mesh",
]  # fmt: skip


def value(dtype=np.float32) -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 1.5 - 7).astype(dtype)


def assert_sharded_equal(out: jax.Array, expected: np.ndarray, target: jax.sharding.Sharding):
    assert isinstance(out, jax.Array)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.sharding.is_equivalent_to(target, out.ndim), (out.sharding, target)
    assert {s.device for s in out.addressable_shards} == set(target.addressable_devices)
    for s in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), expected[s.index])
    np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """One checkpoint per saved sharding, written once for the module."""
    root = tmp_path_factory.mktemp("sharded")
    paths = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_plan, "PACK_BELOW", 0)  # each leaf at its own path, as multi-host
        for kind in SAVED:
            x = jax.device_put(value(), sharding(kind))
            paths[kind] = jc.save(
                root / kind, {"w": x, "b": jax.device_put(value()[0], sharding("replicated"))}
            )
    return paths


@pytest.mark.parametrize("kind", SAVED)
def test_each_distinct_shard_is_written_once(kind, saved, monkeypatch):
    monkeypatch.setattr(_plan, "PACK_BELOW", 0)  # a small single-device leaf is packed
    x = jax.device_put(value(), sharding(kind))
    _, arrays, _ = _plan.plan({"w": x})
    pieces = arrays[0].pieces
    assert len(pieces) == DISTINCT[kind]
    starts = {tuple(s.start or 0 for s in p.index) for p in pieces}
    assert len(starts) == DISTINCT[kind]  # no two pieces cover the same slice
    assert sum(p.nbytes for p in pieces) == value().nbytes  # every byte once, replicas skipped

    # the zarr chunk grid is the shard shape: one chunk file per distinct shard
    meta = json.loads(open(os.path.join(saved[kind], "w", "zarr.json")).read())
    chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
    assert tuple(chunk) == tuple(sharding(kind).shard_shape(SHAPE))
    chunk_files = [f for _, _, fs in os.walk(os.path.join(saved[kind], "w", "c")) for f in fs]
    assert len(chunk_files) == DISTINCT[kind]


@pytest.mark.parametrize("kind", SAVED)
def test_restore_without_target_gives_numpy(kind, saved):
    out = jc.restore(saved[kind])
    assert type(out["w"]) is np.ndarray
    np.testing.assert_array_equal(out["w"], value())
    np.testing.assert_array_equal(out["b"], value()[0])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["1d-rows", "2d", "partly-replicated", "replicated"])
def test_restore_onto_another_sharding(kind, target, saved):
    t = sharding(target)
    like = {"w": jax.device_put(jnp.zeros(SHAPE), t), "b": jnp.zeros(SHAPE[1:])}
    out = jc.restore(saved[kind], like)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(like)
    assert_sharded_equal(out["w"], value(), t)
    assert_sharded_equal(out["b"], value()[0], like["b"].sharding)


def test_packed_leaves_restore_onto_a_mesh_of_one_device(tmp_path):
    # A single-GPU job's mesh: the small leaves come out of their pack, whole, onto its device.
    t = sharding("1-device-mesh")
    saved = {"w": value(), "b": value()[0].astype(np.int32)}
    path = jc.save(tmp_path / "ckpt", saved)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=t), saved)
    out = jc.restore(path, like)
    for k in saved:
        assert_sharded_equal(out[k], saved[k], t)


@pytest.mark.parametrize("kind", ["2d", "single-device"])
def test_restore_into_shape_dtype_structs(kind, saved):
    t = sharding("2d-transposed")
    like = {
        "w": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=t),
        "b": jax.ShapeDtypeStruct(SHAPE[1:], jnp.float32),  # no sharding: the default device
    }
    out = jc.restore(saved[kind], like)
    assert_sharded_equal(out["w"], value(), t)
    assert_sharded_equal(out["b"], value()[0], SingleDeviceSharding(jax.local_devices()[0]))


def test_restore_into_numpy_target(saved):
    out = jc.restore(
        saved["2d"], {"w": np.zeros(SHAPE, np.float32), "b": np.zeros(SHAPE[1], np.float32)}
    )
    assert type(out["w"]) is np.ndarray
    np.testing.assert_array_equal(out["w"], value())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.int8, np.uint32, np.bool_, np.complex64])
def test_sharded_dtypes_round_trip(tmp_path, dtype):
    src = sharding("2d")
    x = jax.device_put(value(dtype), src)
    path = jc.save(tmp_path / "ckpt", {"x": x})
    t = sharding("2-way-cols")
    out = jc.restore(path, {"x": jax.ShapeDtypeStruct(SHAPE, dtype, sharding=t)})
    assert_sharded_equal(out["x"], value(dtype), t)
    np.testing.assert_array_equal(jc.restore(path)["x"], value(dtype))


def test_restore_casts_dtype_and_keeps_target_sharding(saved):
    t = sharding("1d-cols")
    out = jc.restore(
        saved["2d"],
        {
            "w": jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16, sharding=t),
            "b": np.zeros(SHAPE[1], np.float32),
        },
    )
    assert_sharded_equal(out["w"], value().astype(ml_dtypes.bfloat16), t)


def test_large_shards_are_cut_into_chunks_inside_shard_boundaries(tmp_path, monkeypatch):
    from jaxckpt.storage import arrays as _storage

    monkeypatch.setattr(_storage, "CHUNK_BYTES", 8 * 16 * 4 // 16)  # force several chunks a shard
    x = jax.device_put(value(), sharding("2-way"))
    path = jc.save(tmp_path / "ckpt", {"w": x})
    chunk = jc.open(path).record("w")["chunks"]
    shard = sharding("2-way").shard_shape(SHAPE)
    assert tuple(chunk) != tuple(shard)
    assert all(s % c == 0 for s, c in zip(shard, chunk, strict=True)), (shard, chunk)
    assert_sharded_equal(jc.restore(path, {"w": x})["w"], value(), sharding("2-way"))


def test_indivisible_target_sharding_is_refused_by_jax(saved):
    # JAX itself refuses uneven NamedShardings (8 rows over 3 devices); nothing to restore onto.
    t = NamedSharding(mesh((3,), ("x",)), P("x"))
    with pytest.raises(ValueError, match="evenly divide|divisible"):
        jc.restore(
            saved["2d"],
            {
                "w": jax.ShapeDtypeStruct(SHAPE, jnp.float32, sharding=t),
                "b": np.zeros(SHAPE[1], np.float32),
            },
        )
