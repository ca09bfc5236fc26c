"""Restores into a target structure restored before: its key paths are kept (match._kept) and
the abstract values of its shapes (device._avals), and nothing else: a changed structure,
shape, dtype, sharding or rename is seen, and every restore is bit-exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

import jaxckpt as jc
from jaxckpt.checkpoint import match as _match


@pytest.fixture(autouse=True)
def walks(monkeypatch):
    """Counts the walks of a target's key paths (each maps them through ``_renamer``)."""
    _match.clear()
    count = []
    renamer = _match._renamer
    monkeypatch.setattr(_match, "_renamer", lambda *a: count.append(1) or renamer(*a))
    yield count
    _match.clear()


def _tree(k=1.0):
    small = {f"s{i}": jnp.full((i % 5 + 2,), k * i + 0.5, jnp.float32) for i in range(40)}
    return {"small": small, "big": jnp.arange(1000, dtype=jnp.float32) * k, "n": 3}


def _abstract(tree):
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_same_structure_walked_once_and_bit_exact(tmp_path, walks):
    a, b = _tree(1.0), _tree(2.0)
    jc.save(tmp_path / "a", a)
    jc.save(tmp_path / "b", b)
    _equal(jc.restore(tmp_path / "a", _abstract(a)), a)
    _equal(jc.restore(tmp_path / "b", _abstract(a)), b)  # another checkpoint, same target
    _equal(jc.restore(tmp_path / "a", _abstract(a)), a)
    assert len(walks) == 1


def test_changed_structure_is_walked_again(tmp_path, walks):
    a = _tree()
    jc.save(tmp_path / "a", a)
    jc.restore(tmp_path / "a", _abstract(a))
    more = {**_abstract(a), "extra": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(jc.StructureMismatchError, match=r"\['extra'\]"):
        jc.restore(tmp_path / "a", more)
    assert len(walks) == 2
    fewer = _abstract(a)
    del fewer["small"]["s3"]
    out = jc.restore(tmp_path / "a", fewer, partial=True)
    assert "s3" not in out["small"] and len(walks) == 3
    _equal(out["small"]["s4"], a["small"]["s4"])


def test_changed_shape_or_dtype_is_a_mismatch_by_key_path(tmp_path, walks):
    a = _tree()
    jc.save(tmp_path / "a", a)
    jc.restore(tmp_path / "a", _abstract(a))
    shape = _abstract(a)
    shape["small"]["s7"] = jax.ShapeDtypeStruct((9,), jnp.float32)  # same structure
    with pytest.raises(
        jc.StructureMismatchError, match=r"\['small'\]\['s7'\]: the target expects float32\[9\]"
    ):
        jc.restore(tmp_path / "a", shape)
    dtype = _abstract(a)
    dtype["big"] = jax.ShapeDtypeStruct((1000,), jnp.int32)
    with pytest.raises(jc.StructureMismatchError, match=r"\['big'\]: the target expects int32"):
        jc.restore(tmp_path / "a", dtype)
    wider = _abstract(a)
    wider["big"] = jax.ShapeDtypeStruct(
        (1000,), jnp.float64 if jax.config.x64_enabled else jnp.bfloat16
    )
    out = jc.restore(tmp_path / "a", wider)
    assert out["big"].dtype == wider["big"].dtype
    assert len(walks) == 1  # the same structure each time: its paths were kept


def test_changed_sharding_is_followed(tmp_path):
    a = _tree()
    jc.save(tmp_path / "a", a)
    devices = jax.devices()
    one = jc.restore(tmp_path / "a", _abstract(a))
    assert one["big"].sharding.device_set == {devices[0]}
    other = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(devices[1]))
            if isinstance(x, jax.ShapeDtypeStruct)
            else x
        ),
        _abstract(a),
    )
    moved = jc.restore(tmp_path / "a", other)
    assert moved["small"]["s1"].sharding.device_set == {devices[1]}
    _equal(moved, a)
    mesh = Mesh(np.array(devices[:2]), ("x",))
    split = _abstract(a)
    split["big"] = jax.ShapeDtypeStruct(
        (1000,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("x"))
    )
    out = jc.restore(tmp_path / "a", split)
    assert len(out["big"].addressable_shards) == 2
    _equal(out, a)


def test_rename_and_prefix_are_part_of_the_key(tmp_path, walks):
    a = _tree()
    jc.save(tmp_path / "a", {"model": a})
    target = _abstract(a)
    _equal(jc.restore(tmp_path / "a", target, prefix="model"), a)
    _equal(jc.restore(tmp_path / "a", target, rename={"^": "model/"}), a)
    _equal(jc.restore(tmp_path / "a", target, rename={"^": "model/"}), a)
    assert len(walks) == 2
    # A callable may answer differently each time: its paths are never kept.
    for _ in range(2):
        _equal(jc.restore(tmp_path / "a", target, rename=lambda p: f"model/{p}"), a)
    assert len(walks) == 4
    with pytest.raises(jc.StructureMismatchError):
        jc.restore(tmp_path / "a", target, rename={"^": "other/"})
