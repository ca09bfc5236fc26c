"""Real multi-process jobs: 2 and 4 JAX processes of 4 CPU devices each on 127.0.0.1.

Each launch runs tests/multihost_worker.py in every process, several checks per launch (they
are slow to start); the worker writes one result line per check to a
file of its own, asserted on here. Every launch has a
timeout, after which only the processes it started are killed.
"""

from __future__ import annotations

import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import servers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from multihost_tree import SHAPES, Loader, expected
from multiproc import _tail, assert_all_done, launch

import jaxckpt as jc
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.format import metadata as _metadata


def chunk_files(ckpt: str, leaf: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(os.path.join(ckpt, leaf, "c")))


def restore_on_two_devices(ckpt: str, step: int) -> None:
    """This single pytest process restores what many processes wrote onto 2 of its devices."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    rows = NamedSharding(mesh, P("x"))
    target = {
        "params": {
            "w": jax.ShapeDtypeStruct(SHAPES["w"], jnp.float32, sharding=rows),
            "b": jax.ShapeDtypeStruct(SHAPES["b"], jnp.float32, sharding=NamedSharding(mesh, P())),
        },
        "opt": {
            "m": jax.ShapeDtypeStruct(SHAPES["m"], jnp.bfloat16, sharding=rows),
            "c": jax.ShapeDtypeStruct(SHAPES["c"], jnp.float32, sharding=rows),
            "n": np.float32(0),
        },
        "step": 0,
        "host": {"np": np.zeros(3, np.int32), "dev": np.zeros(2, np.int32)},
        "loader": Loader(-1),
    }
    out = jc.restore(ckpt, target)
    assert out["loader"].pos == 1000 * step  # saved by several processes: process 0's
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(target)
    assert out["step"] == step
    for got, name, dtype in [
        (out["params"]["w"], "w", np.float32),
        (out["params"]["b"], "b", np.float32),
        (out["opt"]["m"], "m", jnp.bfloat16),
        (out["opt"]["c"], "c", np.float32),
    ]:
        assert got.dtype == dtype and len(got.addressable_shards) == 2
        for s in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), expected(name, dtype)[s.index])
    assert out["params"]["w"].sharding.is_equivalent_to(rows, 2)
    assert type(out["opt"]["n"]) is np.float32 and out["opt"]["n"] == expected("n")
    np.testing.assert_array_equal(out["host"]["np"], [0, 0, 0])  # process 0's local values
    np.testing.assert_array_equal(out["host"]["dev"], [10, 10])
    numpy = jc.restore(ckpt)
    np.testing.assert_array_equal(numpy["opt"]["m"], expected("m", jnp.bfloat16))


def test_two_processes_save_restore_and_fail_together(tmp_path):
    procs = launch("main", 2, str(tmp_path))
    assert_all_done(procs)
    p0, p1 = (p.results for p in procs)

    # Each distinct shard is written once. The save mesh is 4x2; process 0 holds its rows 0-1,
    # process 1 rows 2-3: a shard both hold (b, c, n) is written by one of them, the less loaded
    # (process 0 also writes the process-local values), a shard one holds by that one.
    host = {"host/np": 1, "host/dev": 1}  # process-local values: process 0's are saved
    assert p0["pieces"]["pieces"] == {
        **{"params/w": 4, "params/b": 0, "opt/m": 2, "opt/c": 1, "opt/n": 1},
        **host,
    }
    assert p1["pieces"]["pieces"] == {
        **{"params/w": 4, "params/b": 1, "opt/m": 2, "opt/c": 1, "opt/n": 0},
        **dict.fromkeys(host, 0),
    }
    ckpt = str(tmp_path / "run" / "ckpt-3")
    assert {leaf: chunk_files(ckpt, leaf) for leaf in ("params/w", "params/b", "opt/m", "opt/c")} == {
        "params/w": 8, "params/b": 1, "opt/m": 4, "opt/c": 2
    }  # fmt: skip
    # The manager: asynchronous saves, process 0 deleted step 1, all processes agree.
    for r in (p0, p1):
        assert {k: r["manager"][k] for k in ("steps", "latest")} == {"steps": [2, 3], "latest": 3}
        assert r["restored@2"]["bytes"] == r["restored@3"]["bytes"] > 0  # onto the other mesh
        # Each process read only the slices its devices of the other mesh hold: half of w and
        # m (their columns split over the 2 processes), all of b, c and n (replicated there).
        assert r["restored@3"]["read"] == {
            "params/w": 64, "params/b": 8, "opt/m": 64, "opt/c": 32, "opt/n": 1,
            "host/np": 3, "host/dev": 2,
        }  # fmt: skip
    # Incremental saves: steps 2 and 3 hold the same values as step 1, so each process linked
    # exactly the chunks it had written itself, and wrote nothing.
    for r in (p0, p1):
        done = r["incremental"]["stats"]
        assert done["1"][0] > 0 and done["1"][1] == 0
        assert done["2"] == done["3"] == [0, done["1"][0]]
    assert p0["incremental"]["stats"]["1"] != p1["incremental"]["stats"]["1"]
    # Preemption: process 1 got SIGTERM at step 12; both saved at the same later step.
    step = p0["preempted"]["step"]
    assert step >= 12 and p1["preempted"]["step"] == step
    assert p0["preempted"]["steps"] == p1["preempted"]["steps"] == [3, step]
    assert sorted(os.listdir(tmp_path / "run")) == sorted(
        [".jaxckpt-writer", "checkpoint", "ckpt-3", f"ckpt-{step}"]
    )
    assert jc.latest_checkpoint(tmp_path / "run") == str(tmp_path / "run" / f"ckpt-{step}")

    # A peer's ordinary error stops every process at the next barrier, without a timeout.
    assert p1["peer-error"]["error"] == "OSError"
    e = p0["peer-error"]
    assert e["error"] == "CoordinationError" and e["seconds"] < 30
    assert re.search(
        r"the save to .*ckpt-fail failed on another process, so every process stops at the "
        r"barrier 'written'\. Nothing was committed; earlier checkpoints are intact\. Fix: see "
        r"that process's log.*\n  process 1: OSError: No space left on device",
        e["message"],
    ), e["message"]

    # Processes saving to different paths: refused before anything is written.
    assert p1["path-mismatch"]["error"] == "CheckpointError"
    assert re.search(
        r"process 1 saves to .*ckpt-4b while process 0 saves to .*ckpt-4\. Every process must "
        r"call save with the same path, in the same order\. Fix: derive the path",
        p1["path-mismatch"]["message"],
    )
    assert p0["path-mismatch"]["error"] == "CoordinationError"
    assert (
        "process 1: CheckpointError: jaxckpt: process 1 saves to" in p0["path-mismatch"]["message"]
    )

    # A path each process resolves to its own disk: refused, nothing left behind.
    assert re.search(
        r"process 1 does not see the directory /proc/self/cwd/ckpt-1\.jaxckpt-tmp-\w+ that "
        r"process 0 created for the save to /proc/self/cwd/ckpt-1: that path is not on storage "
        r"every process shares .* Fix: save to a filesystem mounted on every host",
        p1["not-shared"]["message"],
    ), p1["not-shared"]["message"]
    assert (
        "process 1: CheckpointError: jaxckpt: process 1 does not see" in p0["not-shared"]["message"]
    )
    assert os.listdir(tmp_path / "local-0") == [] and os.listdir(tmp_path / "local-1") == []

    # A peer that hangs past the barrier timeout (4 s here): a timeout naming it, and the fix.
    e = p0["peer-hangs"]
    assert e["error"] == "CoordinationError"
    assert re.search(
        r"the save to .*ckpt-slow stopped at its barrier 'written' \(every process has written "
        r"its shards\) on process 0 of 2: process 1 did not arrive within 4 s: it did not call "
        r"this save, crashed, hung,.* Nothing was committed; earlier checkpoints are intact\. Fix: look for an earlier "
        r"error in the log of process 1; if it is merely slow, raise the timeout, e\.g\. "
        r"JAXCKPT_BARRIER_TIMEOUT_S=1800",
        e["message"],
    ), e["message"]
    assert "arrived after the others had given up waiting (4 s)" in p1["peer-hangs"]["message"]

    # Only the committed checkpoints remain: failed saves left no directory behind.
    assert sorted(os.listdir(tmp_path)) == ["ckpt-a", "local-0", "local-1", "run"]
    restore_on_two_devices(ckpt, 3)
    restore_on_two_devices(str(tmp_path / "ckpt-a"), 7)
    # Each process's loader position is kept in the metadata (they differ), process 0's first.
    rec = jc.open(ckpt).record("loader")
    assert [_metadata.load_state({"v": v}) for v in rec["per_process"]] == [
        {"pos": 3000},
        {"pos": 3001},
    ]
    assert _metadata.load_state(rec) == {"pos": 3000}


def test_peer_killed_mid_save_then_restart_with_four_processes(tmp_path):
    survivor, victim = launch("kill-last", 2, str(tmp_path))
    assert "about-to-die" in victim.results and victim.returncode == -signal.SIGKILL
    assert survivor.results["saved"]["step"] == 1
    # The survivor ends within a bounded time (heartbeat timeout 10 s, barrier timeout 60 s)
    # with an error saying a peer died: ours when Python gets there first, else JAX's own.
    assert survivor.returncode != 0 and "done" not in survivor.results
    assert survivor.ended - victim.results["about-to-die"]["time"] < 40
    ours = survivor.results.get("peer-killed", {}).get("message", "")
    if ours:
        assert re.search(
            r"the save to .*ckpt-2 stopped at its barrier 'written' .* process 1 stopped sending "
            r"heartbeats to JAX's distributed runtime: it died, was killed or was preempted\. "
            r"Nothing was committed; earlier checkpoints are intact\. Fix: restart the job",
            ours,
        ), ours
    else:
        assert "another task died" in survivor.output, _tail(survivor.output)

    # Nothing committed; the earlier checkpoint intact.
    assert not os.path.exists(tmp_path / "ckpt-2")
    with pytest.raises(jc.CheckpointNotFoundError):
        jc.restore(tmp_path / "ckpt-2")
    np.testing.assert_array_equal(jc.restore(tmp_path / "ckpt-1")["params"]["w"], expected("w"))

    # A restarted job of 4 processes restores it onto its own mesh, then saves and restores.
    procs = launch("restart", 4, str(tmp_path))
    assert_all_done(procs)
    for p in procs:
        assert p.results["manager"]["steps"] == [1] and p.results["manager"]["latest"] == 1
        assert p.results["restored@1"]["bytes"] == p.results["restored@3"]["bytes"] > 0
        assert p.results["manager-after"]["steps"] == [1, 3]
    assert sorted(os.listdir(tmp_path)) == [".jaxckpt-writer", "checkpoint", "ckpt-1", "ckpt-3"]
    written = [p.results["pieces"]["pieces"] for p in procs]
    assert [w["params/w"] for w in written] == [4, 4, 4, 4]  # an 8x2 mesh: 16 shards, once each
    assert sum(w["params/b"] for w in written) == 1  # replicated: written by one process
    assert sum(w["opt/m"] for w in written) == 8 and sum(w["opt/c"] for w in written) == 2
    restore_on_two_devices(str(tmp_path / "ckpt-3"), 3)


def test_coordinator_killed_mid_save(tmp_path):
    victim, survivor = launch("kill-first", 2, str(tmp_path))
    assert "about-to-die" in victim.results and victim.returncode == -signal.SIGKILL
    # Process 0 ran the coordination service: the survivor learns at once and ends.
    assert survivor.returncode != 0 and "done" not in survivor.results
    assert survivor.ended - victim.results["about-to-die"]["time"] < 30
    ours = survivor.results.get("peer-killed", {}).get("message", "")
    if ours:
        assert re.search(
            r"the save to .*ckpt-2 stopped at its barrier 'written' .* on process 1 of 2: JAX's "
            r"coordination service \(run by process 0\) is unreachable: process 0 died, or the "
            r"network failed\. Nothing was committed; earlier checkpoints are intact\. Fix: "
            r"restart the job",
            ours,
        ), ours
    else:
        assert "another task died" in survivor.output, _tail(survivor.output)
    # Process 0's temporary directory stays behind as debris; nothing was committed.
    assert not os.path.exists(tmp_path / "ckpt-2")
    leftovers = set(os.listdir(tmp_path)) - {".jaxckpt-writer", "checkpoint", "ckpt-1"}
    assert all(n.startswith("ckpt-2.jaxckpt-tmp-") for n in leftovers), leftovers
    # A manager started on the directory (here in one process) removes it and restores step 1.
    mngr = jc.CheckpointManager(tmp_path)
    assert mngr.steps == [1]
    assert set(os.listdir(tmp_path)) == {".jaxckpt-writer", "checkpoint", "ckpt-1"}
    restore_on_two_devices(mngr.latest_checkpoint, 1)


def test_two_processes_save_to_an_object_store(tmp_path, monkeypatch):
    """s3:// through a real S3 server (moto): each process PUTs its own chunks."""
    server = servers.start_moto(tmp_path / "moto.log")
    try:
        servers.create_s3_bucket(server.url, "jaxckpt-multihost")
        for k, v in servers.DUMMY_AWS.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
        url = "s3://jaxckpt-multihost/run"
        procs = launch("objstore", 2, url)
        assert_all_done(procs)
        for p in procs:
            assert p.results["manager"]["steps"] == [2] and p.results["manager"]["latest"] == 2
            assert p.results["restored"]["read"]["params/w"] == 64  # its own half, no more
        assert jc.latest_checkpoint(url) == f"{url}/ckpt-2"
        restore_on_two_devices(f"{url}/ckpt-2", 2)
    finally:
        server.stop()
        jc.set_storage_options("s3")


def test_barrier_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(_multihost.TIMEOUT_ENV, raising=False)
    assert _multihost.timeout_s() == 600
    monkeypatch.setenv(_multihost.TIMEOUT_ENV, "90.5")
    assert _multihost.timeout_s() == 90.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(_multihost.TIMEOUT_ENV, bad)
        with pytest.raises(
            ValueError,
            match=(
                rf"JAXCKPT_BARRIER_TIMEOUT_S='{bad}' is not a positive number of seconds\. Fix: set "
                r"it to e\.g\. JAXCKPT_BARRIER_TIMEOUT_S=1800, or unset it for the default of 600 s\."
            ),
        ):
            _multihost.timeout_s()


def test_one_process_coordinates_nothing(tmp_path, monkeypatch):
    # No distributed runtime here: every multi-process step must be a no-op, even a bad timeout.
    monkeypatch.setenv(_multihost.TIMEOUT_ENV, "soon")
    _multihost.barrier("never-waits")
    sync = _multihost.SaveSync("a save", ("start",))
    assert sync.share("tmp", lambda: "mine") == "mine"
    sync.barrier("start")
    sync.abandon(OSError("ignored"))
    path = jc.save(tmp_path / "ckpt", {"x": np.arange(3)})
    np.testing.assert_array_equal(jc.restore(path)["x"], np.arange(3))
