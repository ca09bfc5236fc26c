"""The manager's local tier on a real job: 4 JAX processes on 127.0.0.1, each its own host with
its own local directory, a sharded train state (tests/local_tier_worker.py).

One job trains to step 30 (persistent steps 0 and 20, local steps every 5, 2 kept) and loses
process 2 to SIGKILL; each test restarts 4 processes on a copy of what that job left.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from test_multihost import assert_all_done, launch

import jaxckpt as jc
from jaxckpt import _local_tier, cli

WORKER = os.path.join(os.path.dirname(__file__), "local_tier_worker.py")
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
    procs = run("again-kv", job)  # the job then saves on, its parts sent through JAX's store
    assert_all_done(procs)
    for i, p in enumerate(procs):
        assert (p.results["restored"]["latest"], p.results["restored"]["step"]) == (20, 20)
        assert p.results["saved-on"]["at_start"] == [f"{_local_tier.MARKER}{i}"]  # 25, 30 gone
        assert p.results["saved-on"]["local"] == [55, 60]
        assert p.results["saved-on"]["steps"] == [40, 60]


def test_ls_shows_what_a_local_directory_holds(first_job, capsys):
    assert cli.main(["ls", str(first_job / "local-3")]) == 0
    out = capsys.readouterr().out
    assert "the local tier of process 3" in out
    lines = [ln.split() for ln in out.splitlines()]
    assert ["25", "3", "2"] == lines[2][:3] and ["30", "3", "2"] == lines[3][:3], out
