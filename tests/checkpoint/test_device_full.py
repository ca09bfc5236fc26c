"""An async save on an accelerator without room for device copies (simulated on the CPU):
the caller waits for the pieces' transfer to host memory, all queued at once, and nothing
more; later saves take no fresh host memory for what lives on the host."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt as jc
from jaxckpt import runtime as _runtime
from jaxckpt.checkpoint import device as _device
from jaxckpt.checkpoint import snapshot as _snapshot
from jaxckpt.checkpoint import write as _write


def test_to_host_many_gives_copies_the_caller_owns_in_order():
    xs = [jnp.arange(1000, dtype=jnp.float32) * 3, jnp.ones((4, 5), jnp.int8), jnp.zeros(3)]
    expected = [np.array(x) for x in xs]
    hosts = _device.to_host_many(xs)
    for x in xs:
        x.delete()
    for h, e in zip(hosts, expected, strict=True):
        np.testing.assert_array_equal(h, e)
        assert h.dtype == e.dtype
    assert _device.to_host_many([]) == []


@pytest.fixture
def full_accelerator(monkeypatch):
    """jax.Arrays count as accelerator arrays, and no device has room for device copies."""
    monkeypatch.setattr(_write, "_on_accelerator", lambda data: isinstance(data, jax.Array))
    monkeypatch.setattr(_snapshot, "_device_has_room", lambda device, nbytes: False)
    calls = []
    to_host_many = _device.to_host_many

    def spy(xs):
        xs = list(xs)
        calls.append(len(xs))
        return to_host_many(xs)

    monkeypatch.setattr(_device, "to_host_many", spy)
    return calls


def test_without_room_the_caller_waits_for_one_batch_of_host_transfers(tmp_path, full_accelerator):
    params = {
        "w": jnp.full((512, 1024), 1.0, jnp.float32),
        "b": jnp.arange(300_000, dtype=jnp.float32),
        "z": jnp.zeros((300_000,)),  # found all-zero once on the host: not written
    }
    expected = jax.tree_util.tree_map(np.array, params)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(p):
        return jax.tree_util.tree_map(lambda x: x * 0 - 1, p)

    h = jc.save_async(tmp_path / "c", params)
    assert full_accelerator == [3]  # every piece moved in the call, in one batch
    params = step(params)  # donated right after the call returned
    got = jc.restore(h.wait())
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    assert jc.open(h.path).record("z")["zero_chunks"] == "all"


def test_a_save_of_the_same_tree_again_takes_no_fresh_host_memory(tmp_path, monkeypatch):
    """The snapshot buffers of a save (pieces and whole packs) serve the next one."""
    monkeypatch.setattr(_runtime, "_free", {})
    fresh = []
    aligned_empty = _runtime.aligned_empty
    monkeypatch.setattr(
        _runtime, "aligned_empty", lambda *a, **k: fresh.append(a) or aligned_empty(*a, **k)
    )

    def tree(k):
        small = {f"s{i}": jnp.full((i % 9 + 2,), k * i, jnp.float32) for i in range(100)}
        return {"small": small, "big": np.arange(200_000, dtype=np.int64) * k}

    jc.save_async(tmp_path / "a", tree(1)).wait()
    assert len(fresh) == 2  # the big array's buffer and the pack's
    fresh.clear()
    for k in (2, 3):
        jc.save_async(tmp_path / f"c{k}", tree(k)).wait()
    assert fresh == []
    for k in (2, 3):
        got = jc.restore(tmp_path / f"c{k}")
        np.testing.assert_array_equal(got["big"], np.asarray(tree(k)["big"]))
        np.testing.assert_array_equal(got["small"]["s7"], np.asarray(tree(k)["small"]["s7"]))
