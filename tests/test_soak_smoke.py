"""The soak script (benchmarks/soak.py, ``make soak``) at tiny counts, and its checks."""

import json
import os
import shutil
import subprocess
import sys

import jaxckpt as jc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import soak  # noqa: E402
import soak_worker as sw  # noqa: E402


def test_soak_runs_tiny_and_writes_json(tmp_path):
    out = tmp_path / "soak.json"
    # 20 saves are too few to warm up (the thread pools may start after the 4th): the limits on
    # growth are lifted, the other checks hold
    limits = ["--rss-growth-mib", "4096", "--rss-settled-mib", "4096", "--fd-slack", "100"]
    limits += ["--thread-slack", "100"]
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--kills", "4"]
    cmd += ["--saves", "20", "--dir", str(tmp_path), "--json", str(out), "--seed", "7", *limits]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| manager_async | 1 | 0 | 0 | 0 |" in proc.stdout
    assert "| 20 async |" in proc.stdout and "| 20 sync |" in proc.stdout
    res = json.loads(out.read_text())
    assert res["seed"] == 7 and [t["mode"] for t in res["kills"]] == sw.MODES
    for t in res["kills"]:
        assert t["ok"] and not t["lost"] and not t["wrong"] and not t["debris"], t
        assert t["landed"].split()[0] in ("before", "in", "after"), t
    assert [m["mode"] for m in res["memory"]] == ["async", "sync"]
    for m in res["memory"]:
        assert len(m["samples"]) == 20 and not m["failures"], m["failures"]
    assert os.listdir(tmp_path) == ["soak.json"]  # scratch directories removed


def test_the_checks_after_a_kill_catch_a_lost_or_wrong_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    with jc.CheckpointManager(d, max_to_keep=None, async_save=False) as mngr:
        for step in (1, 2, 3, 4):
            mngr.save(step, sw.tree_of(step, on_device=False), metrics=sw.metrics_of(step))
    shutil.rmtree(f"{d}/ckpt-2")  # lost
    jc.save(f"{d}/ckpt-5", sw.tree_of(7, on_device=False), step=5, metrics=sw.metrics_of(5))
    os.makedirs(f"{d}/ckpt-6")  # a save that never committed: the next manager removes it
    got = soak.check_after_kill(d, [1, 2, 3, 4], plain=True)
    assert got["lost"] == [2]
    assert got["wrong"] and all(w.startswith("step 5: ") for w in got["wrong"]), got["wrong"]
    assert got["left_by_kill"] == ["uncommitted ckpt-6"] and got["debris"] == []
    # the manager's retention may drop a step once sw.KEEP newer ones are committed: step 1
    assert soak.check_after_kill(d, [1], plain=False)["lost"] == []
    assert soak.check_after_kill(d, [5], plain=True)["lost"] == []


def test_problems_names_debris_and_uncommitted_checkpoints(tmp_path):
    d = tmp_path / "run"
    for name in ("ckpt-1", "ckpt-2.jaxckpt-tmp-0123456789ab", "ckpt-3", "notes"):
        os.makedirs(d / name)
    (d / "ckpt-1" / "COMMIT").write_text("{}")
    (d / "checkpoint").write_text("{}")
    assert soak.problems(str(d)) == [
        "debris ckpt-2.jaxckpt-tmp-0123456789ab",
        "uncommitted ckpt-3",
        "unexpected notes",
    ]


def test_soak_exits_1_when_a_limit_is_passed(tmp_path):
    """A limit no run can meet (fewer open files than after warm-up) fails the soak."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--kills", "0"]
    cmd += ["--saves", "10", "--memory-modes", "sync", "--fd-slack", "-1"]
    cmd += ["--rss-growth-mib", "4096", "--rss-settled-mib", "4096"]
    cmd += ["--dir", str(tmp_path), "--json", str(tmp_path / "soak.json")]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| 10 sync |" in proc.stdout and "| NO: open files grew after warm-up |" in proc.stdout
    assert json.loads((tmp_path / "soak.json").read_text())["memory"][0]["failures"]
