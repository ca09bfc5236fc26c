"""A tiny run of the benchmark script: every workload, tool and operation runs end to end."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_runs_tiny_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench.py"),
        "--scale",
        "0.0002",
        "-r",
        "1",
        "--steps",
        "1",
        "--compute",
        "0",
        "--no-drop",
        "--workloads",
        "W1,W2,W3",
        "--dir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Floors (issue #6):" in proc.stdout and "| W2       | save " in proc.stdout
    res = json.loads(out.read_text())
    seen = {(t["workload"], t["op"], t["tool"]) for t in res["times"]}
    for tool in ["jaxckpt", "orbax", "orbax_mgr", "flax_msgpack", "raw"]:
        assert ("W2", "save", tool) in seen
    for op in ["restore_warm", "restore_cold", "partial_cold", "restore_extra_ram_x", "files"]:
        assert ("W1", op, "jaxckpt") in seen and ("W1", op, "orbax") in seen
    for op in ["async_block", "async_total", "mgr_block_0s"]:
        assert ("W1", op, "jaxckpt") in seen
    assert ("W1", "async_block", "np.copy") in seen
    assert {("W3", "async_block", "jaxckpt"), ("W3", "restore_warm", "orbax")} <= seen
    assert not os.path.exists(tmp_path / "work" / "W1")  # scratch checkpoints removed
    assert {("W3", "save", "raw"), ("W3", "async_total", "jaxckpt")} <= seen
    assert {("W3", "d2h_pinned", "reference"), ("W3", "async_block_full", "jaxckpt")} <= seen
    assert ("W3", "mgr_block_full", "jaxckpt") in seen
    names = [f["floor"] for f in res["floors"]]
    assert len(names) == 28
    assert "W2 restore cold of an Orbax checkpoint by jaxckpt <= Orbax's own" in names
    assert {"W2 async block <= 2x np.copy", "W2 restore cold <= 1/2 Flax msgpack"} <= set(names)


def test_quiet_disk_watches_the_disk_holding_the_path(tmp_path):
    """quiet_disk reads the io_ticks of the device holding the path: it waits one window at
    least where /proc/diskstats lists that device, and returns at once where it does not."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    st = os.stat(tmp_path)
    listed = False
    if os.path.exists("/proc/diskstats"):
        with open("/proc/diskstats") as f:
            key = [str(os.major(st.st_dev)), str(os.minor(st.st_dev))]
            listed = any(line.split()[:2] == key for line in f)
    waited = bench.quiet_disk(str(tmp_path), window=0.05, limit=5.0)
    assert (waited >= 0.05) if listed else (waited < 0.05)
    assert waited < 6.0
