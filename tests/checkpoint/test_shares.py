"""Replicas share the work: a multi-process save deals the chunks of replicated arrays out among
the processes holding them, and a restore reads each replicated part once and broadcasts it
(4 real JAX processes of 1 CPU device each on 127.0.0.1, tests/shares_worker.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from multiproc import assert_all_done, launch

import jaxckpt as jc
from jaxckpt.checkpoint import broadcast as _broadcast
from jaxckpt.checkpoint import shares as _shares

WORKER = os.path.join(os.path.dirname(__file__), "..", "shares_worker.py")
REPLICATED = ["big", "bf", *(f"vec{i}" for i in range(8))]  # broadcast: 16 KiB or more
BIG = 512 * 256 * 4


def test_replicas_share_the_writing_and_the_reading(tmp_path):
    procs = launch("shares", 4, str(tmp_path), timeout=60, worker=WORKER)
    assert_all_done(procs)
    results = [p.results for p in procs]

    # Sharing: each chunk is written once, by one of the processes holding it, about 1/4 each;
    # the one large replicated array is itself written by all four (2 of its 8 chunks each).
    wrote = [r["wrote-1"]["bytes"] for r in results]
    total = sum(wrote)
    assert max(wrote) <= 0.3 * total, wrote
    assert [r["wrote-1"]["pieces"]["big"] for r in results] == [2, 2, 2, 2]
    for leaf in ["mid", "bf", *(f"vec{i}" for i in range(8))]:
        assert sum(r["wrote-1"]["pieces"][leaf] for r in results) == 1, leaf
    assert [r["wrote-1"]["pieces"]["sharded"] for r in results] == [1, 1, 1, 1]
    assert [r["wrote-1"]["pieces"]["host"] for r in results] == [1, 0, 0, 0]  # process 0's
    assert [r["wrote-async"]["bytes"] for r in results] == wrote
    # Switched off: the holder of replica 0 (process 0) writes all replicated data, as before.
    off = [r["wrote-0"]["bytes"] for r in results]
    assert off[1:] == [8192, 8192, 8192] and sum(off) == total
    # Finer chunks where 4 processes hold them: big has 8 chunk files, not 2.
    assert (
        sum(r["wrote-1"]["files"] for r in results)
        == sum(r["wrote-0"]["files"] for r in results) + 6
    )

    # Read once and broadcast: each replicated chunk read by one process, about 1/4 each;
    # the sharded leaf read directly (each process its own rows), smaller leaves directly.
    rep = sum(BIG if n == "big" else 32768 if n == "bf" else 16384 for n in REPLICATED)
    for kind in ("read-1", "read-1-numpy"):
        shares = [sum(r[kind]["read"].get(n, 0) for n in REPLICATED) for r in results]
        assert sum(shares) == rep and max(shares) <= 0.3 * rep, (kind, shares)
        assert [r[kind]["read"]["big"] for r in results] == [BIG // 4] * 4
        for r in results:
            assert r[kind]["read"]["sharded"] == 2 * 1024 * 4
            assert r[kind]["read"]["mid"] == 100 * 40 * 4
    for kind in ("read-0", "read-0-numpy"):  # without: every process reads everything
        for r in results:
            assert sum(r[kind]["read"].get(n, 0) for n in REPLICATED) == rep
            assert r[kind]["read"]["sharded"] == 2 * 1024 * 4

    # A process that fails to read its share: it raises its error, the others say where.
    assert results[1]["read-fails"]["error"] == "CorruptCheckpointError"
    for i in (0, 2, 3):
        e = results[i]["read-fails"]
        assert e["error"] == "CoordinationError", e
        assert e["message"] == (
            f"jaxckpt: the restore of {tmp_path}/ckpt-1 failed on process 1 while it read its "
            "share of the replicated arrays (each part is read by one process and sent to the "
            "others). Fix: see that process's log for the cause; JAXCKPT_BROADCAST=0 makes "
            "every process read the replicated arrays itself."
        )

    # Both checkpoints restore bit for bit in one process; the shared one has finer chunks.
    shared, alone = jc.restore(tmp_path / "ckpt-1"), jc.restore(tmp_path / "ckpt-0")
    for name in shared:
        np.testing.assert_array_equal(shared[name], alone[name])
    assert (
        shared["big"].shape == (512, 256) and shared["big"][3, 5] == (3 * 256 + 5) % 1000 * 0.5 - 3
    )
    assert jc.open(tmp_path / "ckpt-1").record("big")["chunks"] == [64, 256]


def test_the_switches_read_the_environment(monkeypatch):
    monkeypatch.delenv(_shares.ENV, raising=False)
    monkeypatch.delenv(_broadcast.ENV, raising=False)
    assert _shares.enabled() and _broadcast.mode() == "auto"
    monkeypatch.setenv(_shares.ENV, "0")
    assert not _shares.enabled()
    for raw, mode in [("1", "always"), ("0", "never"), ("auto", "auto")]:
        monkeypatch.setenv(_broadcast.ENV, raw)
        assert _broadcast.mode() == mode
    # One process: nothing to share, nothing to broadcast.
    monkeypatch.setenv(_broadcast.ENV, "1")
    assert _shares.Shares.start() is None and not _broadcast.wanted("s3://bucket/ckpt")
    monkeypatch.setenv(_broadcast.ENV, "sometimes")
    with pytest.raises(
        ValueError,
        match=(
            r"JAXCKPT_BROADCAST='sometimes' is not one of auto, 1 or 0\. Fix: set "
            r"JAXCKPT_BROADCAST=1 to read replicated arrays once and broadcast them, "
            r"JAXCKPT_BROADCAST=0 to read them in every process, or unset it \(auto\)\."
        ),
    ):
        _broadcast.mode()


def test_deal_gives_each_unit_to_the_least_loaded_holder():
    load = [100, 0, 0]
    owner = _shares.deal([50, 50, 50, 10], [(0, 1, 2), (0, 1, 2), (0, 1), (0,)], load)
    assert owner == [1, 2, 1, 0] and load == [110, 100, 50]
