"""Bit-exact save/restore round trips over dtypes, shapes, leaf kinds and tree kinds."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from core_helpers import assert_leaf_equal, assert_tree_equal
from flax import nnx

import jaxckpt as jc

_ML = [
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e4m3b11fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn",
    "int4", "uint4", "int2", "uint2",
]  # fmt: skip
DTYPES = [
    "float64", "float32", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16",
    "uint32", "uint64", "bool", "complex64", "complex128",
] + [d for d in _ML if hasattr(ml_dtypes, d)]  # fmt: skip
SHAPES = [(), (0,), (3, 5), (2, 0, 3), (200, 700)]
_SUBBYTE = {"int4": 4, "uint4": 4, "int2": 2, "uint2": 2, "float4_e2m1fn": 4}


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name, None) or name)


def sample(dtype_name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """An array of ``dtype`` whose bytes cover the type's bit patterns (NaNs, -0.0, ...)."""
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dtype == np.bool_:
        return (rng.integers(0, 2, n) == 1).reshape(shape)
    raw = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    if dtype_name in _SUBBYTE:  # one value per byte, in the low bits
        raw &= (1 << _SUBBYTE[dtype_name]) - 1
        if dtype_name.startswith("int"):  # sign-extend, as ml_dtypes stores them
            top = 1 << (_SUBBYTE[dtype_name] - 1)
            raw = np.where(raw & top, raw | (0xFF ^ ((top << 1) - 1)), raw).astype(np.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_array_roundtrip(tmp_path, dtype, shape):
    tree = {"x": sample(dtype, shape), "y": [sample(dtype, shape, seed=1)]}
    path = jc.save(tmp_path / "c", tree)
    assert jc.list_variables(path) == [
        ("x", shape, _dtype(dtype).name),
        ("y/0", shape, _dtype(dtype).name),
    ]
    assert_tree_equal(jc.restore(path), tree)
    assert_tree_equal(jc.restore(path, tree), tree)


@pytest.mark.parametrize(
    "dtype", [d for d in DTYPES if d not in ("float64", "int64", "uint64", "complex128")]
)
def test_jax_array_roundtrip(tmp_path, dtype):
    tree = {"a": jnp.asarray(sample(dtype, (3, 5))), "s": jnp.asarray(sample(dtype, ()))}
    assert tree["a"].dtype == _dtype(dtype)
    path = jc.save(tmp_path / "c", tree)
    out = jc.restore(path, tree)
    assert_tree_equal(out, tree)
    assert isinstance(out["a"], jax.Array) and out["a"].sharding == tree["a"].sharding
    assert_tree_equal(jc.restore(path), jax.tree_util.tree_map(np.asarray, tree))


class Pair(NamedTuple):
    first: jax.Array
    second: dict


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Registered:
    w: jax.Array
    b: np.ndarray
    name: str = dataclasses.field(metadata={"static": True}, default="layer")


@flax.struct.dataclass
class StructState:
    step: jax.Array
    params: dict
    tag: str = flax.struct.field(pytree_node=False, default="t")


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="l1")(nn.Dense(3, name="l0")(x))


class Pytree:
    """A class registered without keys: its children get FlattenedIndexKey edges."""

    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(
    Pytree, lambda p: ((p.a, p.b), None), lambda _, children: Pytree(*children)
)


def _linen_params():
    return _Net().init(jax.random.key(0), jnp.ones((1, 2)))["params"]


def _trees():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    return {
        "dict_str": {"a": jnp.ones(2), "b": {"c": np.int8(3), "d": np.zeros((2, 2))}},
        "dict_int": {0: jnp.ones(2), 7: {1: np.arange(3)}, -2: np.float32(1.5)},
        "list": [jnp.ones(2), [np.arange(3), []], {}],
        "tuple": (jnp.ones(2), (np.arange(3),), ()),
        "namedtuple": Pair(jnp.ones(3), {"x": np.arange(2)}),
        "adam": optax.adam(0.1).init(params),
        "chained": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init(params),
        "masked": optax.masked(optax.adam(0.1), {"w": True, "b": False}).init(params),
        "empty_state": optax.EmptyState(),
        "registered_dataclass": Registered(jnp.ones((2, 2)), np.arange(3), "enc"),
        "flax_struct": StructState(jnp.int32(4), {"k": jnp.ones(2)}, "x"),
        "linen_dict": _linen_params(),
        "linen_frozen": flax.core.freeze(_linen_params()),
        "unkeyed_node": [Pytree(jnp.ones(2), {"c": np.arange(3)})],
    }


TREES = _trees()


@pytest.mark.parametrize("kind", list(TREES))
def test_tree_kind_roundtrip(tmp_path, kind):
    tree = TREES[kind]
    path = jc.save(tmp_path / "c", tree)
    out = jc.restore(path, tree)
    assert type(out) is type(tree)
    assert_tree_equal(out, tree)
    # Without a target: plain containers of NumPy leaves at the same paths.
    got, want = _by_path(jc.restore(path)), _by_path(tree)
    assert list(got) == list(want)
    for p, w in want.items():
        assert_leaf_equal(got[p], np.asarray(w) if isinstance(w, jax.Array) else w, p)


def _by_path(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return dict(sorted((jax.tree_util.keystr(k, simple=True, separator="/"), v) for k, v in flat))


def test_no_target_rebuilds_plain_containers(tmp_path):
    tree = {
        "l": [np.ones(1), (np.zeros(2), None)],
        "nt": Pair(np.ones(1), {"x": np.arange(2)}),
        "dc": Registered(np.ones(2), np.arange(3)),
        "i": {3: np.int16(2)},
        "masked": optax.masked(optax.sgd(0.1, momentum=0.9), {"a": False}).init({"a": np.ones(2)}),
    }
    out = jc.restore(jc.save(tmp_path / "c", tree))
    want = {
        "l": [np.ones(1), (np.zeros(2), None)],
        "nt": {"first": np.ones(1), "second": {"x": np.arange(2)}},
        "dc": {"w": np.ones(2), "b": np.arange(3)},
        "i": {3: np.int16(2)},
        "masked": {"inner_state": ({"trace": {"a": {}}}, {})},
    }
    assert_tree_equal(out, want)


def test_scalars_text_bytes_none(tmp_path):
    tree = {
        "py": [
            0,
            -(2**62),
            True,
            False,
            1.5,
            float("inf"),
            float("-inf"),
            float("nan"),
            -0.0,
            2 + 3j,
        ],
        "np": [np.float32(1.25), np.int64(-7), np.bool_(True), np.complex64(1 - 2j), np.uint8(255)],
        "text": ["", "héllo ✓", b"", b"\x00\xffbytes"],
        "none": None,
        "nested_none": [None, {"a": None}],
    }
    path = jc.save(tmp_path / "c", tree)
    assert_tree_equal(jc.restore(path, tree), tree)
    assert_tree_equal(jc.restore(path), tree)
    assert jc.open(path)["py/8"] == 0.0 and str(jc.open(path)["py/8"]) == "-0.0"


class Iterator:
    """A data iterator whose position is saved with get_state/set_state."""

    def __init__(self, data):
        self.data, self.pos, self.seen = data, 0, []

    def __next__(self):
        x = self.data[self.pos % len(self.data)]
        self.pos += 1
        return x

    def get_state(self):
        return {"pos": self.pos, "rng": np.arange(4, dtype=np.uint32), "tag": ("a", 1.5)}

    def set_state(self, state):
        self.pos = state["pos"]
        self.seen.append(state)


def test_stateful_object_roundtrip(tmp_path):
    it = Iterator(list(range(10)))
    for _ in range(7):
        next(it)
    path = jc.save(tmp_path / "c", {"step": 7, "iterator": it})
    assert ("iterator", (), "state") in jc.list_variables(path)
    fresh = Iterator(list(range(10)))
    out = jc.restore(path, {"step": 0, "iterator": fresh})
    assert out["iterator"] is fresh and out["step"] == 7
    assert fresh.pos == 7 and next(fresh) == 7
    state = fresh.seen[0]
    np.testing.assert_array_equal(state["rng"], np.arange(4, dtype=np.uint32))
    assert state["rng"].dtype == np.uint32 and state["tag"] == ["a", 1.5]
    # Without a target the saved state itself comes back.
    assert jc.restore(path)["iterator"]["pos"] == 7


def test_nnx_state_roundtrip_and_update(tmp_path):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(2, 5, rngs=rngs)
            self.bn = nnx.BatchNorm(5, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)  # its state holds a typed PRNG key

    model = Model(nnx.Rngs(0))
    model.bn.mean.value = jnp.arange(5.0)
    state = nnx.state(model)
    path = jc.save(tmp_path / "c", state)
    names = [p for p, _, _ in jc.list_variables(path)]
    assert "l1/kernel/value" in names and "bn/mean/value" in names

    assert ("drop/rngs/key/value", (), "key<fry>") in jc.list_variables(path)

    fresh = Model(nnx.Rngs(1))
    target = nnx.state(fresh)
    out = jc.restore(path, target)
    assert type(out) is type(target)
    assert_tree_equal(_key_data(out), _key_data(state))
    nnx.update(fresh, out)
    assert_tree_equal(_key_data(nnx.state(fresh)), _key_data(state))
    np.testing.assert_array_equal(fresh.bn.mean.value, jnp.arange(5.0))
    # Abstract target: the state of nnx.eval_shape, leaves as ShapeDtypeStruct.
    abstract = nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(2))))
    assert_tree_equal(_key_data(jc.restore(path, abstract)), _key_data(state))


def test_step_and_metrics_are_recorded(tmp_path):
    metrics = {"loss": jnp.float32(0.5), "acc": np.float64(0.25), "n": 3}
    reader = jc.open(jc.save(tmp_path / "c", {"w": np.ones(2)}, step=7, metrics=metrics))
    assert reader.step == 7
    assert reader.metrics == {"loss": 0.5, "acc": 0.25, "n": 3}


def _key_data(tree):
    is_key = lambda x: jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda x: (str(x.dtype), jax.random.key_data(x)) if is_key(x) else x, tree
    )


def test_typed_prng_keys(tmp_path):
    tree = {
        "key": jax.random.key(3),
        "split": jax.random.split(jax.random.key(1), 4),
        "rbg": jax.random.key(0, impl="rbg"),
    }
    path = jc.save(tmp_path / "c", tree)
    assert jc.list_variables(path) == [
        ("key", (), "key<fry>"), ("rbg", (), "key<rbg>"), ("split", (4,), "key<fry>")
    ]  # fmt: skip
    like = {
        "key": jax.random.key(0),
        "split": jax.random.split(jax.random.key(0), 4),
        "rbg": jax.random.key(9, impl="rbg"),
    }
    assert_tree_equal(_key_data(jc.restore(path, like)), _key_data(tree))
    assert_tree_equal(_key_data(jc.restore(path)), _key_data(tree))
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    abstract = jax.ShapeDtypeStruct((4,), tree["split"].dtype, sharding=sharding)
    out = jc.restore(path, {"split": abstract}, partial=True)["split"]
    assert out.sharding == sharding
    np.testing.assert_array_equal(jax.random.key_data(out), jax.random.key_data(tree["split"]))
    with pytest.raises(
        jc.StructureMismatchError,
        match=r"\['rbg'\]: the target expects key<fry>\[\], the checkpoint has key<rbg>\[\]",
    ):
        jc.restore(path, {**like, "rbg": jax.random.key(0)})
