"""The manager's local tier on a real job: 4 JAX processes on 127.0.0.1, each its own host with
its own local directory, a sharded train state (tests/local_tier_worker.py).

One job trains to step 30 (persistent steps 0 and 20, local steps every 5, 2 kept) and loses
process 2 to SIGKILL; each test restarts 4 processes on a copy of what that job left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct

import numpy as np
import pytest
from multiproc import assert_all_done, launch

import jaxckpt as jc
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.local_tier import channel as _local_channel
from jaxckpt.local_tier import parts as _local_parts
from jaxckpt.local_tier import tier as _local_tier
from jaxckpt.tools import cli as cli

WORKER = os.path.join(os.path.dirname(__file__), "..", "local_tier_worker.py")
N = 4


def run(scenario: str, directory, timeout: float = 120.0):
    return launch(scenario, N, str(directory), timeout=timeout, worker=WORKER)


def torn_down(procs, victim: int) -> None:
    for i, p in enumerate(procs):
        if i == victim:
            assert p.returncode == -9, p.output[-3000:]
        else:
            assert "torn-down" in p.results, p.output[-3000:]


@pytest.fixture(scope="module")
def first_job(tmp_path_factory):
    directory = tmp_path_factory.mktemp("first")
    procs = run("first", directory)
    torn_down(procs, victim=2)
    for p in procs:
        r = p.results["saved"]
        assert (r["steps"], r["local"], r["latest"]) == ([0, 20], [25, 30], 30)
    for i in range(N):  # its own part and a replica of its predecessor's, for steps 25 and 30
        for step in (25, 30):
            parts = sorted(os.listdir(directory / f"local-{i}" / f"ckpt-{step}"))
            assert parts == sorted([f"process-{i}", f"process-{(i - 1) % N}"])
    os.remove(directory / "victim-about-to-die")
    return directory


def copy_of(first_job, tmp_path):
    shutil.copytree(first_job, tmp_path / "job")
    return tmp_path / "job"


def test_lost_host_restores_the_local_step_then_the_job_saves_and_rotates(first_job, tmp_path):
    job = copy_of(first_job, tmp_path)
    shutil.rmtree(job / "local-2")  # process 2's host is new: nothing of its own survived

    procs = run("resume", job)
    torn_down(procs, victim=1)
    for p in procs:
        # Step 30, bit for bit (checked in each process against what it saved), though its
        # part of step 30 survived only as process 3's replica; the persistent tier has 20.
        assert (p.results["restored"]["latest"], p.results["restored"]["step"]) == (30, 30)
        r = p.results["rotated"]
        assert (r["steps"], r["local"], r["latest"]) == ([20, 40], [45, 50], 50)
    assert sorted(os.listdir(job / "run")) == [
        ".jaxckpt-writer",
        "checkpoint",
        "ckpt-20",
        "ckpt-40",
    ]
    for i in range(N):
        held = [n for n in os.listdir(job / f"local-{i}") if n.startswith("ckpt-")]
        assert {"ckpt-45", "ckpt-50"} <= set(held)
    # Process 2 got its part of step 30 back from process 3 (then retention removed it).

    # Process 1 was killed while writing its part of local step 55: the newest step every part
    # of which survived is 50 (the persistent tier has 40).
    procs = run("again", job)
    assert_all_done(procs)
    for i, p in enumerate(procs):
        assert (p.results["restored"]["latest"], p.results["restored"]["step"]) == (50, 50)
        # Step 55, which can no longer be assembled, was removed when the manager started.
        assert [n for n in p.results["saved-on"]["at_start"] if n.startswith("ckpt-")] == [
            "ckpt-45",
            "ckpt-50",
        ]
        assert p.results["saved-on"]["local"] == [55, 60]
        assert p.results["saved-on"]["steps"] == [40, 60]
        assert p.results["other-mesh"] == {**p.results["other-mesh"], "step": 60, "local": [55, 60]}
        assert sorted(n for n in os.listdir(job / f"local-{i}") if n.startswith("ckpt-")) == [
            "ckpt-55",
            "ckpt-60",
        ]
    # The persistent checkpoints are plain ones: they restore anywhere.
    np.testing.assert_array_equal(
        jc.restore(job / "run" / "ckpt-60")["params"]["w"], np.arange(128).reshape(16, 8) * 0.5 + 61
    )


def test_a_part_and_its_replica_both_lost_falls_back_to_the_persistent_tier(first_job, tmp_path):
    job = copy_of(first_job, tmp_path)
    shutil.rmtree(job / "local-1")  # process 1's part of each step ...
    shutil.rmtree(job / "local-2")  # ... and its replica, held by process 2
    # The job then saves on, its parts sent through JAX's store, until a preemption.
    procs = run("again-preempt-kv", job)
    assert_all_done(procs)
    for i, p in enumerate(procs):
        assert (p.results["restored"]["latest"], p.results["restored"]["step"]) == (20, 20)
        assert p.results["saved-on"]["at_start"] == [f"{_local_tier.MARKER}{i}"]  # 25, 30 gone
        assert p.results["saved-on"]["local"] == [55, 60]
        assert p.results["saved-on"]["steps"] == [40, 60]
        # Process 1 got SIGTERM at step 62: all saved the same later step, to both tiers.
        step = procs[0].results["preempted"]["step"]
        assert step >= 62 and p.results["preempted"]["step"] == step
        last = (step - 1) // 20 * 20, (step - 1) // 5 * 5  # the saves due before it
        assert p.results["preempted"]["steps"] == [last[0], step]
        assert p.results["preempted"]["local"] == [last[1], step]


def test_ls_shows_what_a_local_directory_holds(first_job, capsys):
    assert cli.main(["ls", str(first_job / "local-3")]) == 0
    out = capsys.readouterr().out
    assert "the local tier of process 3" in out
    lines = [ln.split() for ln in out.splitlines()]
    assert ["25", "3", "2"] == lines[2][:3] and ["30", "3", "2"] == lines[3][:3], out


# ---------------------------------------------------------------------------- one process


def test_placement_keeps_replicas_off_their_host():
    assert _local_tier.placement(["h0", "h1", "h2", "h3"], 1) == {0: [1], 1: [2], 2: [3], 3: [0]}
    # Two hosts of two processes: each process's replica lies on the other host.
    assert _local_tier.placement(["a", "a", "b", "b"], 1) == {0: [2], 1: [3], 2: [0], 3: [1]}
    assert _local_tier.placement(["a", "b", "c"], 2) == {0: [1, 2], 1: [2, 0], 2: [0, 1]}
    # One host: no replica can leave it (the tier warns); more replicas than other hosts: fewer.
    assert _local_tier.placement(["a", "a"], 1) == {0: [], 1: []}
    assert _local_tier.placement(["a", "b"], 3) == {0: [1], 1: [0]}


def test_a_step_counts_when_every_part_survives_in_the_layout_asked_for():
    def inv(held, need="L"):
        return {"held": {k: [2, "L"] for k in held}, "need": need}

    # Process 1's part of step 10 survives only as process 0's replica; step 5 lacks it.
    invs = [inv(["10/0", "10/1", "5/0"]), inv(["5/0"])]
    assert _local_tier._usable(invs, 2, None) == {10: {0: [0], 1: [0]}}
    assert _local_tier._usable(invs, 2, ["L", "L"]) == {10: {0: [0], 1: [0]}}
    # Another mesh or sharding (another layout) for either process: nothing local serves it.
    assert _local_tier._usable(invs, 2, ["L", "other"]) == {}
    # Parts saved by another number of processes never count.
    assert _local_tier._usable([inv(["10/0", "10/1"])] * 3, 3, None) == {}


def manager(tmp_path, **kw):
    args = dict(save_interval_steps=10, max_to_keep=3, local_directory=tmp_path / "local")
    args.update(local_save_interval_steps=5, local_max_to_keep=2)
    return jc.CheckpointManager(tmp_path / "run", **{**args, **kw})


def tree(step):
    return {"w": np.arange(6, dtype=np.float32) + step, "step": step}


@pytest.mark.parametrize("async_save", [True, False])
def test_one_process_local_saves_rotate_apart_from_persistent_ones(tmp_path, async_save):
    mngr = manager(tmp_path, async_save=async_save)
    assert mngr.should_save(5) and not mngr.should_save(6)
    saved = [s for s in range(0, 41) if mngr.save(s, tree(s))]
    assert saved == [0, 5, 10, 15, 20, 25, 30, 35, 40]  # a local-only step returns True too
    mngr.wait_until_finished()
    assert mngr.steps == [20, 30, 40] and mngr.latest_step == 40
    assert mngr._local.steps == [35, 40]
    mngr.save(41, tree(41), force=True)  # preemption: both tiers
    mngr.save(43, tree(43))  # neither
    mngr.close()
    assert mngr.steps == [30, 40, 41] and mngr._local.steps == [40, 41]
    local = sorted(n for n in os.listdir(tmp_path / "local") if n.startswith("ckpt-"))
    assert local == ["ckpt-40", "ckpt-41"]
    # Each part is a plain checkpoint: the process's own arrays and values.
    part = jc.restore(tmp_path / "local" / "ckpt-41" / "process-0")
    np.testing.assert_array_equal(part["tree"]["w"], tree(41)["w"])


def test_a_local_save_owns_its_copy_the_caller_may_donate_or_change_its_arrays(tmp_path):
    import threading

    import jax

    mngr = manager(tmp_path)
    w = jax.numpy.arange(6, dtype=jax.numpy.float32) + 5
    b = np.arange(4) + 5
    release = threading.Event()
    mngr._local._pool.submit(release.wait)  # the save's write runs after the changes below
    assert mngr.save(5, {"w": w, "b": b})
    doubled = jax.jit(lambda x: x * 2, donate_argnums=0)(w)  # w's buffer may be reused
    b += 100
    release.set()
    mngr.close()
    np.testing.assert_array_equal(np.asarray(doubled), (np.arange(6) + 5) * 2)
    part = jc.restore(tmp_path / "local" / "ckpt-5" / "process-0")
    np.testing.assert_array_equal(part["tree"]["w"], np.arange(6, dtype=np.float32) + 5)
    np.testing.assert_array_equal(part["tree"]["b"], np.arange(4) + 5)


def test_one_process_restores_the_newer_tier(tmp_path):
    with manager(tmp_path) as mngr:
        for s in range(0, 16):
            mngr.save(s, tree(s))
    mngr = manager(tmp_path)
    assert mngr.steps == [0, 10] and mngr.latest_step == 15
    assert mngr.latest_checkpoint == str(tmp_path / "run" / "ckpt-10")  # the persistent tier's
    out = mngr.restore(target=tree(0))
    assert out["step"] == 15
    np.testing.assert_array_equal(out["w"], tree(15)["w"])
    assert mngr.restore(10, tree(0))["step"] == 10  # a step of the persistent tier only
    assert mngr.restore(15, tree(0))["step"] == 15
    with pytest.raises(jc.CheckpointNotFoundError, match="Step 12 has no committed checkpoint"):
        mngr.restore(12, tree(0))
    mngr.close()


def test_ls_of_a_one_process_local_directory(tmp_path, capsys):
    with manager(tmp_path) as mngr:
        for s in range(0, 11):
            mngr.save(s, tree(s))
    assert cli.main(["ls", str(tmp_path / "local")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("the local tier of process 0")
    assert [ln.split()[:3] for ln in out[1:]] == [
        ["STEP", "OWN", "REPLICAS"],
        ["5", "0", "-"],
        ["10", "0", "-"],
    ]


def test_bad_local_arguments_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"local_directory must be a path on this host's own disk"):
        manager(tmp_path, local_directory="s3://bucket/local")
    with pytest.raises(ValueError, match=r"peer_replicas must be a non-negative int, not -1\."):
        manager(tmp_path, peer_replicas=-1)
    with pytest.raises(ValueError, match=r"local_save_interval_steps must be a positive int"):
        manager(tmp_path, local_save_interval_steps=0)
    monkeypatch.setenv("JAXCKPT_LOCAL_TRANSPORT", "carrier-pigeon")
    with pytest.raises(
        ValueError,
        match=r"JAXCKPT_LOCAL_TRANSPORT='carrier-pigeon' is not a transport of the local tier\. "
        r"Fix: set it to 'tcp'",
    ):
        _local_channel.transport(str(tmp_path))


def a_part(tmp_path):
    path = str(tmp_path / "src" / "ckpt-1" / "process-0")
    jc.save(path, {"a": np.arange(1000, dtype=np.int64), "b": np.zeros(0), "s": "x"})
    return path


def received(tmp_path, staged):
    dest = str(tmp_path / "dst" / "ckpt-1" / "process-0")
    _local_parts.place(staged, dest)
    np.testing.assert_array_equal(jc.restore(dest)["a"], np.arange(1000))
    return dest


@contextlib.contextmanager
def tcp_pair(tmp_path):
    """Two connected TCP transports, process 0 (sending from src) and 1 (receiving in dst)."""
    os.makedirs(tmp_path / "dst")
    sender = _local_channel.Tcp(str(tmp_path / "src"))
    receiver = _local_channel.Tcp(str(tmp_path / "dst"))
    try:
        for t in (sender, receiver):
            t.connect([sender.address(), receiver.address()])
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("splice", [True, False])
def test_tcp_transport_moves_a_part_and_reports_failures(tmp_path, monkeypatch, splice):
    if not splice:  # a system without splice: the bytes are read, then written
        monkeypatch.delattr(os, "splice", raising=False)
    with tcp_pair(tmp_path) as (sender, receiver):
        sender.send("k/1", a_part(tmp_path), 1, "a part")
        received(tmp_path, receiver.receive("k/1", 0, "a part"))
        sender.fail("k/2", OSError("disk full"), 1)
        with pytest.raises(
            jc.CoordinationError,
            match=r"jaxckpt: a part did not come from process 0: it failed: OSError: disk full\. "
            r"Fix: see that process's log for the cause\.",
        ):
            receiver.receive("k/2", 0, "a part")
        receiver.close()
        with pytest.raises(jc.CoordinationError, match=r"could not send a part to process 1 at"):
            sender.send("k/3", str(tmp_path / "src" / "ckpt-1" / "process-0"), 1, "a part")


def test_a_part_sent_over_several_connections_counts_only_when_all_arrive_whole(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_local_channel, "STREAMS", 3)
    with tcp_pair(tmp_path) as (sender, receiver):
        sender.send("k/1", a_part(tmp_path), 1, "a part")
        received(tmp_path, receiver.receive("k/1", 0, "a part"))

        def stream(name: bytes, data: bytes, size: int) -> None:
            head = json.dumps(
                {"key": "k/2", "files": [[name.decode()], [size]], "durable": False, "streams": 2}
            ).encode()
            with socket.create_connection(tuple(receiver.address())) as s:
                s.sendall(struct.pack("!Q", len(head)) + head + data)
                if len(data) == size:
                    assert s.recv(1) == b"\x01"

        stream(b"whole", b"x" * 100, 100)
        stream(b"COMMIT", b"y" * 10, 100)  # the other connection breaks off
        with pytest.raises(
            jc.CoordinationError,
            match=r"a part did not come from process 0: it was cut short \(EOFError: the "
            r"connection closed in the middle of the part\)",
        ):
            receiver.receive("k/2", 0, "a part")
        assert [
            n for n in os.listdir(tmp_path / "dst") if ".jaxckpt-tmp-" in n
        ] == []  # nothing staged


class FakeStore:
    """The key-value store of JAX's distributed runtime, in one process."""

    def __init__(self):
        self.kv = {}

    def key_value_set(self, k, v):
        self.kv[k] = v

    key_value_set_bytes = key_value_set

    def blocking_key_value_get(self, k, ms):
        return self.kv[k]

    blocking_key_value_get_bytes = blocking_key_value_get

    def key_value_delete(self, k):
        del self.kv[k]


def test_kv_transport_streams_a_part_in_chunks(tmp_path, monkeypatch):
    store = FakeStore()
    monkeypatch.setattr(_multihost, "_client", lambda: store)
    monkeypatch.setattr(_local_channel, "KV_CHUNK", 333)  # files straddle chunks
    os.makedirs(tmp_path / "dst")
    kv = _local_channel.Kv(str(tmp_path / "dst"))
    kv.send("k/1", a_part(tmp_path), 1, "a part")
    assert sum(k.startswith("k/1/c/") for k in store.kv) > 10
    received(tmp_path, kv.receive("k/1", 0, "a part"))
    assert store.kv == {}  # every chunk deleted once read
    kv.fail("k/2", OSError("disk full"), 1)
    with pytest.raises(jc.CoordinationError, match=r"it failed: OSError: disk full\. Fix: see"):
        kv.receive("k/2", 0, "a part")


def test_a_failed_local_save_is_reported_and_not_counted(tmp_path, monkeypatch):
    mngr = manager(tmp_path, async_save=False)
    mngr.save(5, tree(5))  # persistent step 0 was never saved: this manager starts at 5
    real = _local_tier._checkpoint.save

    def full(path, *a, **kw):
        if "ckpt-15" in path:
            raise OSError(28, "No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(_local_tier._checkpoint, "save", full)
    with pytest.raises(
        jc.CheckpointError,
        match=r"The local save of step 15 to .*local/ckpt-15/process-0 failed: .*No space left on "
        r"device.* That step is not in the local tier; earlier steps and the persistent tier are "
        r"intact\. Fix: remove the cause",
    ):
        mngr.save(15, tree(15))
    assert mngr._local.steps == [5] and mngr.latest_step == 5
    assert mngr.save(20, tree(20))  # the manager goes on
    mngr.close()
    assert mngr._local.steps == [5, 20]


def test_a_part_that_never_comes_or_comes_without_commit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCKPT_BARRIER_TIMEOUT_S", "0.2")
    receiver = _local_channel.Tcp(str(tmp_path))
    try:
        with pytest.raises(
            jc.CoordinationError,
            match=r"jaxckpt: a part did not come from process 3: nothing arrived within 0\.2 s: "
            r"it died, hung, or cannot reach this process at .*\. Fix: see the log of process 3",
        ):
            receiver.receive("never", 3, "a part")
    finally:
        receiver.close()
    os.makedirs(tmp_path / "staged" / "x")
    with pytest.raises(
        jc.CheckpointError, match=r"the part received for .*process-0 has no COMMIT"
    ):
        _local_parts.place(str(tmp_path / "staged"), str(tmp_path / "ckpt-1" / "process-0"))
    assert not os.path.exists(tmp_path / "staged")
