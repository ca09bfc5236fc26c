"""Plans of trees saved before (_plan_cache): reused only while the tree's key is unchanged;
an async snapshot copies each pack into one buffer and seals it in the background."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt as jc
from jaxckpt import runtime as _runtime
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.checkpoint import plan_cache as _plan_cache


@pytest.fixture(autouse=True)
def walks(monkeypatch):
    """Counts the full walks (``_plan.plan``) of the test's saves."""
    _plan_cache.clear()
    count = []
    plan = _plan.plan
    monkeypatch.setattr(_plan, "plan", lambda tree: count.append(1) or plan(tree))
    yield count
    _plan_cache.clear()


def _tree(k=1.0, n=80):
    """Enough small leaves to be packed (sizes not multiples of the pack alignment), a big
    one, NumPy ones, Python values."""
    small = {f"s{i}": jnp.full((i % 7 + 3,), k * i, jnp.float32) for i in range(n)}
    return {
        "small": small,
        "big": jnp.arange(300_000, dtype=jnp.float32) * k,
        "host": {"a": np.full((5, 3), k, np.float64), "b": np.int16(7)},
        "step": int(k),
        "name": f"run-{k}",
    }


def _assert_same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        if isinstance(y, (str, int)):
            assert x == y
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            assert np.asarray(x).dtype == np.asarray(y).dtype


@pytest.mark.parametrize("save", ["sync", "async"])
def test_a_tree_saved_again_is_not_walked_again_and_restores_bit_exact(tmp_path, walks, save):
    do = jc.save if save == "sync" else lambda p, t: jc.save_async(p, t).wait()
    for k in range(1, 4):
        tree = _tree(float(k))  # new arrays and values, the same key
        do(tmp_path / f"c{k}", tree)
        _assert_same(jc.restore(tmp_path / f"c{k}", tree), tree)
        _assert_same(jc.restore(tmp_path / f"c{k}"), jax.tree_util.tree_map(np.asarray, tree))
    assert len(walks) == 1
    # Every packed leaf's own checksum is right: reading one alone checks it.
    for i in (0, 41, 79):
        got = jc.open(tmp_path / "c3")[f"small/s{i}"]
        np.testing.assert_array_equal(got, np.full((i % 7 + 3,), 3.0 * i, np.float32))


def _changed():
    tree = _tree()
    yield "a key added", {**tree, "extra": jnp.ones(3)}
    yield "a shape", {**tree, "big": jnp.arange(300_001, dtype=jnp.float32)}
    yield "a dtype", {**tree, "small": {**tree["small"], "s3": jnp.full((6,), 3, jnp.int32)}}
    yield "a leaf type", {**tree, "step": 1.5}
    devices = jax.devices()
    if len(devices) > 1:
        moved = jax.device_put(tree["small"]["s5"], devices[1])
        yield "a sharding", {**tree, "small": {**tree["small"], "s5": moved}}


@pytest.mark.parametrize("what, tree", list(_changed()), ids=[w for w, _ in _changed()])
def test_a_changed_tree_is_walked_again(tmp_path, walks, what, tree):
    jc.save(tmp_path / "a", _tree())
    jc.save(tmp_path / "b", tree)
    assert len(walks) == 2, what
    _assert_same(jc.restore(tmp_path / "b", tree), tree)
    if what == "a sharding":
        got = jc.restore(tmp_path / "b", tree)["small"]["s5"]
        assert got.devices() == {jax.devices()[1]}


def test_changed_packing_settings_are_walked_again(tmp_path, walks, monkeypatch):
    jc.save(tmp_path / "a", _tree())
    monkeypatch.setattr(_plan, "PACK_MIN_LEAVES", 1000)  # no pack now
    jc.save(tmp_path / "b", _tree())
    assert len(walks) == 2
    assert "packed" not in jc.open(tmp_path / "b").record("small/s1")
    _assert_same(jc.restore(tmp_path / "b", _tree()), _tree())


def test_trees_with_stateful_leaves_are_walked_every_time(tmp_path, walks):
    class Counter:
        def __init__(self, n):
            self.n = n

        def get_state(self):
            return {"n": self.n}

        def set_state(self, state):
            self.n = state["n"]

    for k in range(2):
        jc.save(tmp_path / f"c{k}", {"w": np.ones(3), "c": Counter(k)})
    assert len(walks) == 2
    c = Counter(-1)
    jc.restore(tmp_path / "c1", {"w": np.ones(3), "c": c})
    assert c.n == 1


def test_donated_arrays_after_a_cached_async_save_do_not_change_it(tmp_path, walks):
    @functools.partial(jax.jit, donate_argnums=0)
    def step(p):
        return jax.tree_util.tree_map(lambda x: x * 0 - 1, p)

    jc.save_async(tmp_path / "warm", _tree()).wait()
    tree = _tree(5.0)
    expected = jax.tree_util.tree_map(np.array, tree)
    h = jc.save_async(tmp_path / "c", tree)
    small = step(tree["small"])  # donates the packed leaves' buffers the save was given
    tree["host"]["a"][:] = -1  # mutates a NumPy leaf in place
    assert len(walks) == 1
    got = jc.restore(h.wait())
    _assert_same(got, expected)
    assert float(small["s1"][0]) == -1


def test_pack_gaps_are_zero_in_a_reused_buffer(tmp_path, monkeypatch):
    """A pooled buffer holds an earlier save's bytes: the gaps between leaves are zeroed."""
    monkeypatch.setattr(_runtime, "_free", {})
    tree = _tree()
    size = jc.save_async(tmp_path / "a", tree).wait() and _runtime.pooled_bytes()
    assert size
    for bufs in _runtime._free.values():
        for b in bufs:
            b.fill(0xFF)
    jc.save_async(tmp_path / "b", tree).wait()
    import zarr

    raw = np.asarray(zarr.open_array(str(tmp_path / "b" / "~pack" / "0"), mode="r")[:])
    used = np.zeros(raw.size, bool)
    r = jc.open(tmp_path / "b")
    for path in r.paths:
        if "packed" in r.record(path):
            start, nbytes, _ = r.record(path)["packed"]
            used[start : start + nbytes] = True
    assert used.any() and not raw[~used].any()
    _assert_same(jc.restore(tmp_path / "b", tree), tree)
