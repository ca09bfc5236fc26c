"""Restore into a target: dtypes, shardings, partial, missing="keep", prefix, rename, match."""

from __future__ import annotations

import logging
import os
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_helpers import assert_tree_equal
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

import jaxckpt as jc


class Net(nn.Module):
    """The seed guide's model: one Dense(5) layer named l1."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="l1")(x)


def seed_state(seed: int = 0) -> dict:
    variables = Net().init(jax.random.key(seed), jnp.ones((1, 1)))
    variables = jax.tree_util.tree_map(lambda x: x + seed + 1, variables)  # a nonzero bias
    tx = optax.adam(0.1)
    return {"params": variables["params"], "opt_state": tx.init(variables), "step": 10 * seed}


@pytest.fixture
def seed_ckpt(tmp_path):
    state = seed_state(1)
    return jc.save(tmp_path / "ckpt-1", state), state


def test_seed_guide_names(seed_ckpt):
    path, _ = seed_ckpt
    assert jc.list_variables(path) == [
        ("opt_state/0/count", (), "int32"),
        ("opt_state/0/mu/params/l1/bias", (5,), "float32"),
        ("opt_state/0/mu/params/l1/kernel", (1, 5), "float32"),
        ("opt_state/0/nu/params/l1/bias", (5,), "float32"),
        ("opt_state/0/nu/params/l1/kernel", (1, 5), "float32"),
        ("params/l1/bias", (5,), "float32"),
        ("params/l1/kernel", (1, 5), "float32"),
        ("step", (), "int"),
    ]


def test_restore_only_the_bias(seed_ckpt):
    """The seed guide's partial restore: a tiny target net -> l1 -> bias."""
    path, state = seed_ckpt
    target = {"params": {"l1": {"bias": jnp.zeros(5)}}}
    status = jc.match(path, target)
    assert status.missing == [] and status.mismatched == []
    assert status.unused == [
        "opt_state/0/count",
        "opt_state/0/mu/params/l1/bias",
        "opt_state/0/mu/params/l1/kernel",
        "opt_state/0/nu/params/l1/bias",
        "opt_state/0/nu/params/l1/kernel",
        "params/l1/kernel",
        "step",
    ]
    assert status.assert_existing_objects_matched() is status
    with pytest.raises(jc.StructureMismatchError, match=r"Saved leaves the target lacks \(7\)"):
        status.assert_consumed()
    out = jc.restore(path, target, partial=True)
    assert_tree_equal(out, {"params": {"l1": {"bias": state["params"]["l1"]["bias"]}}})
    # The same object path with prefix=: the subtree params/l1 becomes the target's root.
    out = jc.restore(path, {"bias": jnp.zeros(5)}, prefix="params/l1", partial=True)
    assert_tree_equal(out, {"bias": state["params"]["l1"]["bias"]})


def test_full_match_is_consumed(seed_ckpt):
    path, state = seed_ckpt
    status = jc.match(path, seed_state(2))
    assert (status.missing, status.unused, status.mismatched) == ([], [], [])
    status.assert_consumed()
    assert_tree_equal(jc.restore(path, seed_state(2)), state)
    # An abstract target (jax.eval_shape) gives jax.Arrays, the step included.
    abstract = jax.eval_shape(lambda: seed_state(2))
    out = jc.restore(path, abstract)
    assert_tree_equal(out, {**state, "step": jnp.asarray(10, abstract["step"].dtype)})


def test_partial_never_reads_unused_leaves(tmp_path):
    big = np.arange(2**18, dtype=np.float32).reshape(512, 512)  # 1 MiB: its own zarr array
    path = jc.save(tmp_path / "c", {"unused": big, "used": big + 1, "small": np.ones(3)})
    chunks = [os.path.join(d, f) for d, _, fs in os.walk(f"{path}/unused/c") for f in fs]
    assert chunks
    for c in chunks:
        os.remove(c)
    out = jc.restore(
        path, {"used": np.zeros((512, 512), np.float32), "small": np.zeros(3)}, partial=True
    )
    assert_tree_equal(out, {"used": big + 1, "small": np.ones(3)})
    with pytest.raises(jc.CorruptCheckpointError, match="'unused'"):
        jc.restore(path, {"unused": np.zeros((512, 512), np.float32)}, partial=True)


def test_missing_keep(seed_ckpt, caplog):
    path, state = seed_ckpt
    head = jnp.full((5, 3), 7.0)
    target = {"params": {"l1": seed_state(2)["params"]["l1"], "head": {"kernel": head}}}
    with caplog.at_level(logging.WARNING, logger="jaxckpt"):
        out = jc.restore(path, target, partial=True, missing="keep")
    assert_tree_equal(out["params"]["l1"], state["params"]["l1"])
    assert out["params"]["head"]["kernel"] is head
    assert "params/head/kernel" in caplog.text
    status = jc.match(path, target)
    assert status.missing == ["params/head/kernel"]
    with pytest.raises(jc.StructureMismatchError, match="Target leaves the checkpoint lacks"):
        status.assert_existing_objects_matched()


def test_prefix_and_rename(tmp_path):
    backbone = {"enc": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.ones(3)}}
    path = jc.save(tmp_path / "c", {"params": {"backbone": backbone, "head": np.zeros(2)}})
    like = jax.tree_util.tree_map(np.zeros_like, backbone)
    assert_tree_equal(jc.restore(path, like, prefix="params/backbone"), backbone)
    assert_tree_equal(jc.restore(path, prefix="params/backbone"), backbone)

    target = {"encoder": jax.tree_util.tree_map(np.zeros_like, backbone["enc"]), "head": np.ones(2)}
    want = {"encoder": backbone["enc"], "head": np.zeros(2)}
    by_regex = {r"^encoder/": "backbone/enc/"}
    assert_tree_equal(jc.restore(path, target, prefix="params", rename=by_regex), want)
    by_fn = lambda p: p.replace("encoder", "backbone/enc")  # noqa: E731
    assert_tree_equal(jc.restore(path, target, prefix="params", rename=by_fn), want)
    assert_tree_equal(
        jc.restore(
            path, target, rename={r"^encoder": "params/backbone/enc", r"^head": "params/head"}
        ),
        want,
    )
    # A callable returning None leaves that leaf out of the checkpoint: keep the target's own.
    skip_head = lambda p: None if p == "head" else p.replace("encoder", "backbone/enc")  # noqa: E731
    out = jc.restore(path, target, prefix="params", rename=skip_head, missing="keep", partial=True)
    assert_tree_equal(out, {"encoder": backbone["enc"], "head": np.ones(2)})


def test_target_dtypes_are_cast(tmp_path):
    saved = {
        "f32": np.linspace(-3, 3, 7, dtype=np.float32),
        "i8": np.arange(-3, 4, dtype=np.int8),
        "py_int": 5,
        "np_f32": np.float32(2.5),
        "b": np.array([True, False]),
    }
    path = jc.save(tmp_path / "c", saved)
    target = {
        "f32": jnp.zeros(7, jnp.bfloat16),
        "i8": np.zeros(7, np.float32),
        "py_int": jnp.zeros((), jnp.int32),
        "np_f32": 0.0,
        "b": np.zeros(2, np.int32),
    }
    out = jc.restore(path, target)
    want = {
        "f32": jnp.asarray(saved["f32"]).astype(jnp.bfloat16),
        "i8": saved["i8"].astype(np.float32),
        "py_int": jnp.int32(5),
        "np_f32": 2.5,
        "b": np.array([1, 0], np.int32),
    }
    assert_tree_equal(out, want)


def test_target_shardings(tmp_path):
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    data = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    saved = jax.device_put(data, NamedSharding(mesh, PartitionSpec("x", "y")))
    path = jc.save(tmp_path / "c", {"w": saved, "v": jnp.arange(8)})
    cases = {
        "array": jax.device_put(np.zeros_like(data), NamedSharding(mesh, PartitionSpec("y", "x"))),
        "sds": jax.ShapeDtypeStruct(
            (16, 8), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "x"))
        ),
        "sds_bf16": jax.ShapeDtypeStruct(
            (16, 8), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("x"))
        ),
        "replicated": jax.ShapeDtypeStruct(
            (16, 8), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec())
        ),
        "one_device": jax.device_put(np.zeros_like(data), jax.devices()[3]),
    }
    for name, like in cases.items():
        out = jc.restore(path, {"w": like}, partial=True)["w"]
        assert isinstance(out, jax.Array), name
        assert out.sharding == like.sharding, name
        assert out.dtype == like.dtype, name
        np.testing.assert_array_equal(np.asarray(out), data.astype(like.dtype), name)
    out = jc.restore(
        path,
        {
            "w": jax.ShapeDtypeStruct((16, 8), jnp.float32),
            "v": jax.ShapeDtypeStruct((8,), jnp.int32),
        },
    )
    assert out["w"].sharding == SingleDeviceSharding(jax.devices()[0])
    assert_tree_equal(out, {"w": jnp.asarray(data), "v": jnp.arange(8)})


def test_reader_api(seed_ckpt):
    path, state = seed_ckpt
    reader = jc.open(path)
    assert sorted(reader.paths) == [p for p, _, _ in jc.list_variables(path)]
    assert "params/l1/kernel" in reader and len(reader) == 8
    np.testing.assert_array_equal(reader["params/l1/kernel"], state["params"]["l1"]["kernel"])
    np.testing.assert_array_equal(
        reader.read("params/l1/bias", (slice(1, 3),)), state["params"]["l1"]["bias"][1:3]
    )
    assert reader["step"] == 10
    assert_tree_equal(reader.tree("params"), jax.tree_util.tree_map(np.asarray, state["params"]))
    with pytest.raises(KeyError, match="'params/l2' is not a leaf of the checkpoint"):
        reader["params/l2"]


def test_each_array_goes_to_its_device_as_soon_as_it_is_read(tmp_path, monkeypatch):
    """Whole arrays are put on their device by the thread that read them, cast on the way."""
    from jaxckpt.checkpoint import device as _device

    tree = {f"w{i}": np.full((300_000,), i, np.float32) for i in range(6)}
    jc.save(tmp_path / "c", tree)
    threads, put_many = [], _device.put_many

    def recording(arrays, shardings):
        threads.append(threading.current_thread().name)
        return put_many(arrays, shardings)

    monkeypatch.setattr(_device, "put_many", recording)
    dev = jax.devices()[0]
    target = {
        k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16, sharding=SingleDeviceSharding(dev))
        for k, v in tree.items()
    }
    out = jc.restore(tmp_path / "c", target)
    assert len(threads) == 6 and all(t.startswith("jaxckpt-read") for t in threads)
    for k, v in tree.items():
        assert isinstance(out[k], jax.Array) and out[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out[k], np.float32), v)


def test_a_match_status_says_what_a_restore_would_raise(seed_ckpt):
    path, _ = seed_ckpt
    target = {"params": {"l1": {"bias": jnp.zeros(5)}}, "extra": jnp.zeros(2)}
    status = jc.match(path, target)
    with pytest.raises(jc.StructureMismatchError) as raised:
        jc.restore(path, target)
    assert status.message() == str(raised.value)
    assert "Saved leaves the target lacks" in status.message()  # the optimizer state, say
    assert "Saved leaves the target lacks" not in status.message(unused=False)
    assert "['extra']" in status.message(unused=False)  # what the checkpoint lacks
