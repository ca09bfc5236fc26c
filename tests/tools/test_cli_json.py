"""The command line's machine-readable side: --json, a closed pipe, --version."""

import json
import os
import subprocess
import sys

import numpy as np
from test_cli import ROOT, _chunks, _flip_a_bit, _own_paths, run, seed_tree

import jaxckpt as jc


class Position:
    """A data iterator's state: saved through get_state, as a "state" leaf."""

    def get_state(self):
        return {"position": 3}

    def set_state(self, state):
        pass


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["command"] == argv[0]
    return code, doc, err


def test_ls_json(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with jc.CheckpointManager(run_dir, max_to_keep=2) as mngr:
        for step in (10, 20, 30):
            mngr.save(step, seed_tree(step), metrics={"loss": 1.0 / step})
    os.makedirs(run_dir / "ckpt-40")  # a save that never committed
    code, doc, _ = run_json(capsys, "ls", str(run_dir))
    assert code == 0
    assert doc["directory"] == str(run_dir)
    assert doc["unfinished"] == ["ckpt-40"]
    rows = doc["checkpoints"]
    assert [(r["step"], r["name"], r["path"]) for r in rows] == [
        (20, "ckpt-20", f"{run_dir}/ckpt-20"),
        (30, "ckpt-30", f"{run_dir}/ckpt-30"),
    ]
    assert [r["metrics"] for r in rows] == [{"loss": 0.05}, {"loss": 1 / 30}]
    assert all(r["bytes"] > 124 and r["time"] > 1e9 and r["error"] is None for r in rows)


def test_inspect_json(tmp_path, capsys):
    tree = {**seed_tree(), "iterator": Position()}
    ckpt = jc.save(tmp_path / "ckpt", tree, step=10, metrics={"loss": 0.5})
    code, doc, _ = run_json(capsys, "inspect", ckpt)
    assert code == 0
    assert doc["checkpoint"]["path"] == ckpt
    assert doc["checkpoint"]["step"] == 10 and doc["checkpoint"]["metrics"] == {"loss": 0.5}
    leaves = {leaf["path"]: leaf for leaf in doc["leaves"]}
    assert leaves["params/l1/kernel"] == {
        "path": "params/l1/kernel",
        "kind": "array",
        "shape": [1, 5],
        "dtype": "float32",
        "bytes": 20,
    }
    assert leaves["step"] == {
        "path": "step",
        "kind": "value",
        "shape": [],
        "dtype": "int",
        "bytes": None,
    }
    assert leaves["iterator"]["kind"] == "state"
    assert doc["bytes"] == 124 and len(leaves) == 9
    code, doc, _ = run_json(capsys, "inspect", ckpt, "params")
    assert [leaf["path"] for leaf in doc["leaves"]] == ["params/l1/bias", "params/l1/kernel"]


def test_diff_json(tmp_path, capsys):
    a = jc.save(tmp_path / "a", {**seed_tree(10), "iterator": Position()})
    b = seed_tree(20, scale=2.0)
    del b["iterator"]
    b["extra"] = np.zeros(3, np.float16)
    b["params"]["l1"]["bias"] = np.zeros(7, np.float32)
    b = jc.save(tmp_path / "b", b)
    code, doc, _ = run_json(capsys, "diff", a, b)
    assert code == 1 and doc["same"] is False
    assert doc["a"]["path"] == a and doc["b"]["path"] == b
    assert doc["only_a"] == [{"path": "iterator", "kind": "state"}]
    assert doc["only_b"] == [{"path": "extra", "kind": "array", "shape": [3], "dtype": "float16"}]
    assert doc["changed"] == [
        {
            "path": "params/l1/bias",
            "a": {"kind": "array", "shape": [5], "dtype": "float32"},
            "b": {"kind": "array", "shape": [7], "dtype": "float32"},
        }
    ]
    values = {v["path"]: v for v in doc["values"]}
    assert values["params/l1/kernel"] == {
        "path": "params/l1/kernel",
        "differ": 4,
        "size": 5,
        "max_abs_diff": 4.0,
    }
    assert values["step"]["a"] == {"kind": "value", "type": "int", "value": "10"}
    assert values["step"]["b"]["value"] == "20"
    code, doc, _ = run_json(capsys, "diff", a, a)
    assert code == 0 and doc["same"] is True and doc["equal"] == 9 and doc["values"] == []


def test_diff_json_writes_infinity_as_a_string(tmp_path, capsys):
    a = jc.save(tmp_path / "a", {"x": np.array([1.0, 2.0], np.float32)})
    b = jc.save(tmp_path / "b", {"x": np.array([1.0, np.inf], np.float32)})
    code, doc, _ = run_json(capsys, "diff", a, b)
    assert code == 1 and doc["values"][0]["max_abs_diff"] == "inf"


def test_verify_json(tmp_path, capsys, monkeypatch):
    _own_paths(monkeypatch)
    ckpt = jc.save(tmp_path / "ckpt", seed_tree())
    code, doc, _ = run_json(capsys, "verify", "-q", ckpt)
    assert code == 0
    assert doc == {
        "schema": 1,
        "command": "verify",
        "path": ckpt,
        "ok": True,
        "arrays": 7,
        "bytes": 124,
        "damaged": [],
    }
    _flip_a_bit(_chunks(ckpt, "params/l1/kernel")[0])
    code, doc, _ = run_json(capsys, "verify", "-q", ckpt)
    assert code == 1 and doc["ok"] is False
    [damage] = doc["damaged"]
    assert damage["path"] == "params/l1/kernel" and "params/l1/kernel/c" in damage["error"]
    with open(os.path.join(ckpt, "zarr.json"), "w") as f:
        f.write("{not json")
    code, doc, _ = run_json(capsys, "verify", "-q", ckpt)
    assert code == 1 and doc["ok"] is False and doc["arrays"] is None
    assert doc["damaged"][0]["path"] is None and "zarr.json" in doc["damaged"][0]["error"]


def test_usage_errors_with_json_stay_on_stderr(tmp_path, capsys):
    code, out, err = run(capsys, "inspect", str(tmp_path / "nothing"), "--json")
    assert code == 2 and out == "" and err.startswith("jaxckpt inspect: error: ")


def _jaxckpt(*argv, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "jaxckpt", *argv], env=env, **kw)


def test_a_closed_pipe_ends_quietly_with_status_0(tmp_path):
    # `jaxckpt inspect X | head -1`: far more output than a pipe holds, so the write fails.
    ckpt = jc.save(tmp_path / "ckpt", {f"layer_{i:04d}": np.float32(i) for i in range(3000)})
    for argv in (["inspect", ckpt], ["inspect", ckpt, "--json"]):
        p = _jaxckpt(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = p.stdout.readline()
        p.stdout.close()  # what `head -1` does once it has its line
        err = p.stderr.read()
        p.stderr.close()
        assert p.wait(timeout=120) == 0, err
        assert first and err == b""


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"jaxckpt {jc.__version__}\n"
