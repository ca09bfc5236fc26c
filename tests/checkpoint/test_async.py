"""save_async: snapshot then background write; errors surfaced; donation-safe; bounded memory."""

import functools
import os
import threading
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt as jc
from jaxckpt import runtime as _runtime
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.checkpoint import save_steps as _steps
from jaxckpt.checkpoint import snapshot as _snapshot
from jaxckpt.storage import chunk_files as _chunks


def _tree():
    return {
        "params": {
            "w": jnp.arange(400_000, dtype=jnp.float32).reshape(400, 1000),
            "b": jnp.ones(7),
        },
        "np": {"big": np.arange(300_000, dtype=np.int32), "small": np.arange(5, dtype=np.int8)},
        "step": 3,
    }


def _assert_same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_async_round_trip_and_handle(tmp_path):
    tree = _tree()
    h = jc.save_async(tmp_path / "ckpt", tree, step=3)
    assert h.wait() == str(tmp_path / "ckpt")
    assert h.done() and "done" in repr(h)
    assert h.wait() == h.path  # waiting twice is fine
    _assert_same(jc.restore(h.path, tree), tree)
    assert jc.open(h.path).step == 3


def test_donated_and_mutated_arrays_after_return_do_not_change_the_checkpoint(tmp_path):
    params = {"w": jnp.full((512, 1024), 1.0, jnp.float32), "b": jnp.full((7,), 2.0)}
    host = {"big": np.full(300_000, 5, np.int32), "small": np.full(5, 6, np.int8)}
    expected = jax.tree_util.tree_map(np.array, {"params": params, "host": host})

    @functools.partial(jax.jit, donate_argnums=0)
    def step(p):
        return jax.tree_util.tree_map(lambda x: x * 0 - 1, p)

    handles = []
    for i in range(2):
        handles.append(jc.save_async(tmp_path / f"ckpt-{i}", {"params": params, "host": host}))
        params = step(params)  # donates the buffers the save was given
        host["big"][:] = -1  # in-place mutation of the caller's NumPy arrays
        host["small"][:] = -1
        if i == 0:
            expected1 = jax.tree_util.tree_map(np.array, {"params": params, "host": host})
    _assert_same(jc.restore(handles[0].wait()), expected)
    _assert_same(jc.restore(handles[1].wait()), expected1)


def test_background_error_is_raised_by_wait(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    h = jc.save_async(tmp_path / "afile" / "ckpt", _tree())
    with pytest.raises(OSError):
        h.wait()
    assert h.done()


def test_background_error_nobody_waited_for_is_raised_by_the_next_save(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    h = jc.save_async(tmp_path / "afile" / "ckpt", _tree())
    futures.wait([h._future])  # finished, but nobody called wait()
    with pytest.raises(
        jc.CheckpointError,
        match=r"An earlier asynchronous save to .*afile/ckpt failed: .*Fix: resolve the cause and save again",
    ):
        jc.save(tmp_path / "next", {"x": np.ones(3)})
    # Raised once: the following save goes ahead.
    assert jc.save(tmp_path / "next", {"x": np.ones(3)}) == str(tmp_path / "next")
    np.testing.assert_array_equal(jc.restore(tmp_path / "next")["x"], np.ones(3))


def test_async_host_memory_is_bounded(tmp_path, monkeypatch):
    tree = {"x": np.ones((1024, 1024), np.float32), "s": np.ones(10, np.float32)}  # ~5 MiB
    size = _snapshot.snapshot_bytes(*_plan.plan(tree)[1:])
    monkeypatch.setenv("JAXCKPT_ASYNC_HOST_BYTES", str(size + size // 2))
    assert _runtime.async_host_bytes() == size + size // 2
    handles = []
    for i in range(4):
        handles.append(jc.save_async(tmp_path / f"ckpt-{i}", tree))
        # Two snapshots do not fit: when a save_async returns, every older save has finished.
        assert all(h.done() for h in handles[:-1])
        assert _runtime.held_bytes() <= size + size // 2
    for h in handles:
        _assert_same(jc.restore(h.wait()), tree)
    assert _runtime.held_bytes() == 0


def test_one_save_larger_than_the_bound_still_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCKPT_ASYNC_HOST_BYTES", "1000")
    tree = {"x": np.ones((1024, 1024), np.float32)}
    _assert_same(jc.restore(jc.save_async(tmp_path / "ckpt", tree).wait()), tree)
    assert _runtime.held_bytes() == 0


def test_failed_save_releases_its_memory(tmp_path):
    (tmp_path / "afile").write_text("x")
    h = jc.save_async(tmp_path / "afile" / "ckpt", _tree())
    with pytest.raises(OSError):
        h.wait()
    assert _runtime.held_bytes() == 0


def _packed_tree(step):
    """Non-zero leaves: a big array and 64 small ones (so a pack), all depending on ``step``."""
    small = {f"s{i}": np.full(100 + i, step * 1000 + i, np.float32) for i in range(64)}
    return {"big": np.arange(200_000, dtype=np.int64) * step, "small": small}


def test_snapshot_buffers_are_handed_to_the_next_save(tmp_path, monkeypatch):
    monkeypatch.setattr(_runtime, "_free", {})
    one_set = 200_000 * 8 + _plan.PACK_CHUNK  # a snapshot's buffers: big + one pack chunk
    a = _packed_tree(1)
    jc.save_async(tmp_path / "a", a).wait()
    assert _runtime.pooled_bytes() == one_set
    b = _packed_tree(2)
    second = jc.save_async(tmp_path / "b", b)
    assert _runtime.pooled_bytes() == 0  # the second snapshot took the first one's buffers
    b["big"][:] = -1  # the caller's arrays change at once: the snapshot holds its own bytes
    b["small"]["s0"][:] = -1
    second.wait()
    assert _runtime.pooled_bytes() == one_set
    # Overlapping saves: the third is held back while the fourth snapshots into fresh buffers;
    # then the pool keeps both sets, and the next save takes no fresh memory.
    gate = threading.Event()
    execute = _steps.execute

    def held_back(s, budget):
        if s.final.endswith("c"):
            assert gate.wait(60)
        return execute(s, budget)

    monkeypatch.setattr(_steps, "execute", held_back)
    third = jc.save_async(tmp_path / "c", _packed_tree(3))
    fourth = jc.save_async(tmp_path / "d", _packed_tree(4))
    gate.set()
    third.wait(), fourth.wait()
    assert _runtime.pooled_bytes() == 2 * one_set
    jc.save_async(tmp_path / "e", _packed_tree(5)).wait()
    assert _runtime.pooled_bytes() == 2 * one_set  # one set taken and given back: no more
    # Another tree: buffers no snapshot of it could use are let go (both pack chunks fit it).
    other = {"big": np.arange(300_000, dtype=np.int64) + 1, "small": _packed_tree(6)["small"]}
    jc.save_async(tmp_path / "f", other).wait()
    assert _runtime.pooled_bytes() == 300_000 * 8 + 2 * _plan.PACK_CHUNK
    for name, step in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)):
        _assert_same(jc.restore(tmp_path / name), _packed_tree(step))
    _assert_same(jc.restore(tmp_path / "f"), other)


def test_the_buffer_pool_keeps_nothing_over_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(_runtime, "_free", {})
    monkeypatch.setenv("JAXCKPT_ASYNC_HOST_BYTES", str(1 << 20))  # under one snapshot
    jc.save_async(tmp_path / "a", _packed_tree(1)).wait()
    assert _runtime.pooled_bytes() == 1 << 20  # the pack chunk fits; the 1.6 MB array does not


def test_file_writes_wait_while_a_snapshot_is_taken(tmp_path, monkeypatch):
    """The training loop waits for a snapshot: earlier saves' writes leave it the CPU."""
    path, done = os.fspath(tmp_path / "f"), threading.Event()
    with _runtime.writes_paused():
        writer = threading.Thread(target=lambda: (_chunks.write_file(path, [b"abc"]), done.set()))
        writer.start()
        assert not done.wait(0.3) and os.path.getsize(path) == 0
    assert done.wait(30) and open(path, "rb").read() == b"abc"
    seen = []
    snapshot = _snapshot.snapshot
    monkeypatch.setattr(
        _snapshot,
        "snapshot",
        lambda *a, **k: seen.append(_runtime.snapshots_in_progress()) or snapshot(*a, **k),
    )
    jc.save_async(tmp_path / "c", _packed_tree(1)).wait()
    assert seen == [1] and _runtime.snapshots_in_progress() == 0


def test_a_restore_does_not_queue_behind_a_save_in_flight(tmp_path, monkeypatch):
    jc.save(tmp_path / "old", _packed_tree(1))
    gate, write_file = threading.Event(), _chunks.write_file

    def held_back(path, parts):
        assert gate.wait(60)
        write_file(path, parts)

    monkeypatch.setattr(_chunks, "write_file", held_back)
    many = {f"a{i}": np.full(300_000, i, np.int32) for i in range(20)}  # more files than threads
    handle = jc.save_async(tmp_path / "new", many)
    got = []
    reader = threading.Thread(target=lambda: got.append(jc.restore(tmp_path / "old")))
    reader.start()
    reader.join(30)
    gate.set()
    assert got, "the restore waited for the save's writes"
    _assert_same(got[0], _packed_tree(1))
    handle.wait()
    _assert_same(jc.restore(tmp_path / "new"), many)


def test_on_an_accelerator_with_room_the_caller_waits_only_for_device_copies(tmp_path, monkeypatch):
    """Arrays on an accelerator are copied in its memory; their host transfer runs later."""
    monkeypatch.setattr(_snapshot, "_device_has_room", lambda device, nbytes: True)  # the CPU: no
    gate, fetch, fetched = threading.Event(), _snapshot.fetch, []

    def held_back(pieces, taken):
        fetched.append([p.data.unsafe_buffer_pointer() for p in pieces])
        assert gate.wait(60)
        fetch(pieces, taken)

    monkeypatch.setattr(_snapshot, "fetch", held_back)
    params = {
        "w": jnp.full((512, 1024), 1.0, jnp.float32),
        "b": jnp.full((300_000,), 2.0),
        "z": jnp.zeros((300_000,)),  # found all-zero on its way to the host: not written
    }
    expected = jax.tree_util.tree_map(np.array, params)
    given = {p.unsafe_buffer_pointer() for p in jax.tree_util.tree_leaves(params)}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(p):
        return jax.tree_util.tree_map(lambda x: x * 0 - 1, p)

    h = jc.save_async(tmp_path / "c", params)
    params = step(params)  # donated while the snapshot is still on the device
    for _ in range(100):
        if fetched:
            break
        threading.Event().wait(0.05)
    assert len(fetched[0]) == 3 and not given & set(fetched[0]) and not h.done()
    gate.set()
    _assert_same(jc.restore(h.wait()), expected)
    assert jc.open(h.path).record("z")["zero_chunks"] == "all"


def test_device_copies_need_twice_their_bytes_free():
    class Device:
        platform = "gpu"

        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    has_room = _snapshot._device_has_room
    assert has_room(Device({"bytes_limit": 100, "bytes_in_use": 60}), 20)
    assert not has_room(Device({"bytes_limit": 100, "bytes_in_use": 61}), 20)
    assert not has_room(Device(None), 1) and not has_room(Device({"bytes_in_use": 0}), 1)
    assert not has_room(jax.devices()[0], 1)  # on the CPU the host copy is the snapshot


def test_a_device_array_reaches_the_host_as_a_copy_the_save_owns():
    from jaxckpt.checkpoint import device as _device

    x = jnp.arange(1000, dtype=jnp.float32) * 3
    host = _device.to_host(x)  # through pinned host memory (on the CPU backend too)
    assert host.ctypes.data != x.unsafe_buffer_pointer()
    x.delete()
    np.testing.assert_array_equal(host, np.arange(1000, dtype=np.float32) * 3)


def test_a_device_copy_that_fails_falls_back_to_the_host_snapshot(tmp_path, monkeypatch):
    """Out of device memory after all: the call still snapshots, on the host."""
    import types

    def no_room(x):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(_snapshot, "_device_has_room", lambda device, nbytes: True)
    monkeypatch.setattr(_snapshot, "jnp", types.SimpleNamespace(copy=no_room))
    params = {"w": jnp.full((512, 1024), 1.0, jnp.float32)}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(p):
        return jax.tree_util.tree_map(lambda x: x * 0 - 1, p)

    h = jc.save_async(tmp_path / "c", params)
    params = step(params)
    _assert_same(jc.restore(h.wait()), {"w": np.full((512, 1024), 1.0, np.float32)})


def test_async_saves_run_on_workers_that_stay(tmp_path, monkeypatch):
    """Each save's background work runs on a pool worker kept for the next save: starting a
    thread would keep the caller waiting until the new thread runs (35-70 ms with busy threads)."""
    names = []

    def execute(s, budget):
        names.append(threading.current_thread().name)
        return run(s, budget)

    run = _steps.execute
    monkeypatch.setattr(_steps, "execute", execute)
    jc.save_async(tmp_path / "first", _tree()).wait()  # the pool exists, all its workers started
    workers = set(_runtime.pool("save").threads)
    for i in range(3):
        jc.save_async(tmp_path / f"c{i}", _tree()).wait()
    assert set(_runtime.pool("save").threads) == workers  # no thread started
    assert all(n.startswith("jaxckpt-save") for n in names), names


def test_a_handle_reports_its_end_to_callbacks_and_exception(tmp_path):
    seen = []
    handle = jc.save_async(tmp_path / "ok", {"w": np.ones(3)})
    handle.add_done_callback(lambda h: seen.append((h, h.exception())))
    handle.wait()
    assert seen == [(handle, None)] and handle.exception() is None
    (tmp_path / "afile").write_text("not a directory")
    failed = jc.save_async(tmp_path / "afile" / "ckpt", {"w": np.ones(3)})
    with pytest.raises(jc.StorageError):
        failed.wait()
    assert isinstance(failed.exception(), jc.StorageError)
    failed.add_done_callback(lambda h: seen.append((h, type(h.exception()))))
    assert seen[-1] == (failed, jc.StorageError)  # at once: it has ended


def test_a_manager_names_the_path_of_a_step(tmp_path):
    mngr = jc.CheckpointManager(tmp_path / "run")
    assert mngr.checkpoint_path(7) == os.path.join(str(tmp_path / "run"), "ckpt-7")
    mngr.save(7, {"w": np.ones(2)})
    mngr.wait_until_finished()
    assert mngr.latest_checkpoint == mngr.checkpoint_path(7)


@pytest.mark.parametrize(("size", "runs"), [(256, 1), (200_000, 4)])
def test_a_pack_is_copied_on_threads_only_when_its_leaves_are_large(
    tmp_path, monkeypatch, size, runs
):
    # Many small leaves: one run (threads would only pass the GIL around); leaves of
    # 800 KB: the copy is split over the copy threads. Either way the snapshot is exact.
    tree = {f"w{i}": np.full(size, i, np.float32) for i in range(_plan.PACK_MIN_LEAVES)}
    expected = {k: v.copy() for k, v in tree.items()}
    calls = []
    real = _snapshot._copy_run
    monkeypatch.setattr(
        _snapshot,
        "_copy_run",
        lambda buf, s, leaves: (calls.append(len(leaves)), real(buf, s, leaves)),
    )
    h = jc.save_async(tmp_path / "ckpt", tree)
    for v in tree.values():
        v[:] = -1  # the caller changes its arrays once save_async returned
    h.wait()
    assert len(calls) == runs and sum(calls) == len(tree)
    _assert_same(jc.restore(h.path, tree), expected)
