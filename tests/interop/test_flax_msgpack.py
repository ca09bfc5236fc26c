"""Flax msgpack files written by flax.serialization, and files jaxckpt cannot read."""

from __future__ import annotations

import pickle
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt as jc
from jaxckpt import StructureMismatchError, storage
from jaxckpt.tools import cli as cli


def _bits(x):
    arr = np.asarray(x)
    return arr.view(f"u{arr.dtype.itemsize}") if arr.dtype.kind in "fV" else arr


def _tree():
    odd = np.array([np.nan, -0.0, 0.0, np.inf, 1.5], np.float32)
    return {
        "params": {
            "w": jnp.asarray(odd, jnp.bfloat16),
            "b": odd,
            "layers": [np.arange(3), np.ones(2)],
        },
        "step": 5,
        "lr": np.float32(0.5),
        "name": "m",
    }


def test_to_bytes_restores_bit_for_bit(tmp_path):
    path = tmp_path / "model.msgpack"
    tree = _tree()
    path.write_bytes(serialization.to_bytes(tree))
    got = jc.restore(str(path))
    assert got["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(got["params"]["w"]), _bits(np.asarray(tree["params"]["w"])))
    np.testing.assert_array_equal(_bits(got["params"]["b"]), _bits(tree["params"]["b"]))
    assert got["step"] == 5 and got["name"] == "m" and got["lr"] == np.float32(0.5)
    # Into the original tree (a list meets Flax's "0", "1" names).
    target = {
        "params": {"w": jnp.zeros(5, jnp.bfloat16), "b": np.zeros(5, np.float32),
                   "layers": [np.zeros(3, np.int64), np.zeros(2)]},
        "step": 0, "lr": np.float32(0), "name": "",
    }  # fmt: skip
    back = jc.restore(str(path), target)
    assert isinstance(back["params"]["layers"], list)
    np.testing.assert_array_equal(back["params"]["layers"][0], np.arange(3))
    np.testing.assert_array_equal(
        _bits(back["params"]["w"]), _bits(np.asarray(tree["params"]["w"]))
    )
    assert back["step"] == 5 and back["name"] == "m"
    assert ("params/layers/0", (3,), "int64") in jc.list_variables(str(path))
    enc = jc.restore(str(path), {"w": jnp.zeros(5, jnp.float32)}, prefix="params", partial=True)
    assert np.isnan(enc["w"][0]) and str(enc["w"].dtype) == "float32"


def test_chunked_large_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)  # Flax chunks arrays over this
    big = np.arange(1000, dtype=np.float32).reshape(10, 100)
    path = tmp_path / "big.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"big": big, "small": np.ones(2)}))
    assert b"__msgpack_chunked_array__" in path.read_bytes()
    got = jc.restore(str(path), {"big": np.zeros((10, 100), np.float32), "small": np.zeros(2)})
    np.testing.assert_array_equal(got["big"], big)


def test_cli_and_damage(tmp_path, capsys):
    path = tmp_path / "m.msgpack"
    path.write_bytes(serialization.to_bytes({"w": np.ones(3)}))
    assert cli.main(["inspect", str(path)]) == 0
    assert "(Flax msgpack)" in capsys.readouterr().out
    cut = tmp_path / "cut.msgpack"
    cut.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(
        jc.CorruptCheckpointError, match="starts as a Flax msgpack file but cannot be decoded"
    ):
        jc.restore(str(cut))


def test_torch_and_other_formats_say_what_they_are(tmp_path):
    pt = tmp_path / "model.pt"
    with zipfile.ZipFile(pt, "w") as z:  # the layout torch.save writes since PyTorch 1.6
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
        z.writestr("archive/version", "3\n")
    with pytest.raises(
        jc.CheckpointError,
        match=r"is a PyTorch checkpoint \(torch.save\), which jaxckpt does not read.*Fix: .*safetensors",
    ):
        jc.restore(str(pt))
    old = tmp_path / "old.pth"
    old.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(jc.CheckpointError, match="is a Python pickle"):
        jc.list_variables(str(old))
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(jc.CheckpointError, match="is an HDF5 file"):
        jc.open(str(h5))
    assert cli.main(["inspect", str(pt)]) == 2
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(jc.CheckpointNotFoundError, match="No checkpoint at"):
        jc.restore(str(other))


def test_flax_refuses_typed_keys():
    """Why a msgpack file holds a typed key as its key data: Flax itself cannot write one."""
    with pytest.raises(TypeError, match="PRNGKey dtype cannot be converted"):
        serialization.to_bytes({"rng": jax.random.key(0)})


def test_key_data_restores_into_typed_key_targets(tmp_path):
    """jaxckpt -> msgpack (keys written as key data) -> restore into a target holding typed
    keys: wrapped with the target's implementation, bit for bit, on a mesh too."""
    tree = {
        "rng": jax.random.key(3),
        "keys": jax.random.split(jax.random.key(1, impl="rbg"), 8),
        "w": np.array([-0.0, np.nan], np.float32),
    }
    ckpt = jc.save(tmp_path / "ckpt", tree)
    path = jc.convert(ckpt, tmp_path / "k.msgpack")
    mesh = jax.make_mesh((8,), ("d",))
    like = {
        "rng": jax.random.key(0),
        "keys": jax.ShapeDtypeStruct(
            (8,), tree["keys"].dtype, sharding=NamedSharding(mesh, P("d"))
        ),
        "w": np.zeros(2, np.float32),
    }
    for target in (jax.tree.map(lambda x: x, tree), like):
        got = jc.restore(path, target)
        for k in ("rng", "keys"):
            assert got[k].dtype == tree[k].dtype
            assert jax.random.key_impl(got[k]) == jax.random.key_impl(tree[k])
            np.testing.assert_array_equal(jax.random.key_data(got[k]), jax.random.key_data(tree[k]))
        assert got["w"].tobytes() == tree["w"].tobytes()
    assert got["keys"].sharding == like["keys"].sharding
    # A file Flax wrote, holding key data as Flax users save keys.
    flax_file = tmp_path / "flax.msgpack"
    flax_file.write_bytes(serialization.to_bytes({"rng": jax.random.key_data(tree["rng"])}))
    got = jc.restore(flax_file, {"rng": jax.random.key(0)})
    assert jax.random.key_data(got["rng"]).tolist() == jax.random.key_data(tree["rng"]).tolist()


def test_key_data_of_another_shape_says_what_the_key_needs(tmp_path):
    path = tmp_path / "k.msgpack"
    path.write_bytes(serialization.to_bytes({"rng": np.zeros((3, 2), np.uint32)}))
    target = {"rng": jax.random.split(jax.random.key(0, impl="rbg"), 3)}
    with pytest.raises(
        StructureMismatchError,
        match=re.escape(
            "['rng']: the target expects key<rbg>[3] (key data uint32[3, 4]), the checkpoint "
            "has uint32[3, 2]"
        ),
    ):
        jc.restore(path, target)


def test_none_and_empty_containers_restore(tmp_path):
    """Were dropped from a restore without a target: they are kept as Flax restores them."""
    tree = {"w": np.ones(2, np.float32), "none": None, "ed": {}, "el": [], "nested": {"x": {}}}
    path = tmp_path / "m.msgpack"
    path.write_bytes(serialization.to_bytes(tree))
    got = jc.restore(path)
    assert got["none"] is None and got["ed"] == {} and got["nested"] == {"x": {}}
    assert got["el"] == {}  # Flax's state dict of a list is a dict, an empty one too
    assert got.keys() == serialization.msgpack_restore(path.read_bytes()).keys()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    import servers

    srv = servers.start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    servers.create_s3_bucket(srv.url, "jaxckpt-msgpack")
    yield srv
    srv.stop()


def test_reads_from_s3(s3_server, monkeypatch, tmp_path):
    """Was local only ("No checkpoint at ..."): the file's bytes come through the storage
    layer, so a msgpack file on an object store restores like a local one."""
    import servers

    for k, v in servers.DUMMY_AWS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)  # chunked arrays too
    tree = {"params": {"w": np.arange(40, dtype=np.float32), "b": np.array([-0.0, np.nan])}}
    root = f"s3://jaxckpt-msgpack/{tmp_path.name}/"
    storage.at(root).open_kv().write("model.msgpack", serialization.to_bytes(tree)).result()
    url = root + "model.msgpack"
    assert jc.list_variables(url) == [("params/b", (2,), "float64"), ("params/w", (40,), "float32")]
    got = jc.restore(url, tree)
    for k in ("w", "b"):
        assert got["params"][k].tobytes() == tree["params"][k].tobytes()
    with pytest.raises(jc.CheckpointNotFoundError):
        jc.restore(root + "absent.msgpack")
