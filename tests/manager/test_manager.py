"""CheckpointManager: steps, retention, the index, existing steps, debris, async errors."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from core_helpers import edit_metadata

import jaxckpt as jc
from jaxckpt import runtime as _runtime
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import save_steps as _steps
from jaxckpt.format import run as _run
from jaxckpt.storage.local import LocalStore


def tree_of(step):
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) + step, "step": step}


def assert_tree_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def on_disk(d):
    """The committed steps found on disk, and every other name in the directory but the run's
    writer lock (tests/manager/test_concurrent_runs.py tests it)."""
    steps, other = [], []
    for name in sorted(os.listdir(d)):
        if name == ".jaxckpt-writer":
            continue
        if re.fullmatch(r"ckpt-\d+", name) and os.path.isfile(os.path.join(d, name, "COMMIT")):
            steps.append(int(name[5:]))
        else:
            other.append(name)
    return sorted(steps), other


def index_of(d):
    with open(os.path.join(d, "checkpoint")) as f:
        return json.load(f)


@pytest.mark.parametrize("async_save", [False, True])
def test_retention_example_from_the_issue(tmp_path, async_save):
    d = os.fspath(tmp_path / "run")
    with jc.CheckpointManager(d, max_to_keep=2, keep_every_n_steps=30, async_save=async_save) as m:
        for step in range(10, 101, 10):
            assert m.save(step, tree_of(step)) is True
    assert m.steps == [30, 60, 90, 100]
    assert m.checkpoints == [f"{d}/ckpt-{s}" for s in (30, 60, 90, 100)]
    assert m.latest_step == 100 and m.latest_checkpoint == f"{d}/ckpt-100"
    assert on_disk(d) == ([30, 60, 90, 100], ["checkpoint"])
    assert [c["step"] for c in index_of(d)["checkpoints"]] == [30, 60, 90, 100]
    for step in m.steps:
        assert_tree_equal(m.restore(step), tree_of(step))
    assert jc.latest_checkpoint(d) == f"{d}/ckpt-100"


@pytest.mark.parametrize("async_save", [False, True])
def test_max_to_keep_keeps_the_newest(tmp_path, async_save):
    d = os.fspath(tmp_path)
    m = jc.CheckpointManager(d, max_to_keep=3, async_save=async_save)
    for step in range(1, 11):
        m.save(step, tree_of(step))
    m.wait_until_finished()
    assert m.steps == [8, 9, 10] and on_disk(d)[0] == [8, 9, 10]
    m2 = jc.CheckpointManager(d, max_to_keep=None)
    for step in range(11, 16):
        m2.save(step, tree_of(step))
    m2.close()
    assert m2.steps == [8, 9, 10, 11, 12, 13, 14, 15] == on_disk(d)[0]


def test_async_retention_applies_when_the_save_commits(tmp_path):
    d = os.fspath(tmp_path)
    m = jc.CheckpointManager(d, max_to_keep=1)
    m.save(1, tree_of(1))
    m.save(2, tree_of(2))
    while not all(p.handle.done() for p in m._pending):
        time.sleep(0.01)
    assert m.steps == [] and on_disk(d)[0] == [1, 2]  # committed, not yet recorded
    m.wait_until_finished()
    assert m.steps == [2] and on_disk(d) == ([2], ["checkpoint"])


def test_a_save_does_not_wait_for_the_previous_write(tmp_path, monkeypatch):
    gate = threading.Event()
    execute = _steps.execute

    def held_back(s, budget):  # step 1's write waits until the test lets it go
        if s.final.endswith("ckpt-1"):
            assert gate.wait(60)
        return execute(s, budget)

    monkeypatch.setattr(_steps, "execute", held_back)
    d = os.fspath(tmp_path)
    m = jc.CheckpointManager(d, max_to_keep=1)
    m.save(1, tree_of(1))
    assert m.save(2, tree_of(2)) is True  # returned while step 1 is still writing
    assert [p.step for p in m._pending] == [1, 2]
    assert not m._pending[0].handle.done()
    time.sleep(0.3)
    assert not m._pending[1].handle.done()  # writes go in save order: step 2 after step 1
    assert on_disk(d)[0] == []
    assert m.save(2, tree_of(2)) is False  # being saved: should_save says no
    with pytest.raises(jc.CheckpointExistsError, match="Step 2 is already saved"):
        m.save(2, tree_of(2), force=True)
    gate.set()
    m.wait_until_finished()
    assert m.steps == [2] and on_disk(d) == ([2], ["checkpoint"])


def test_retention_removes_the_files_in_the_background(tmp_path, monkeypatch):
    """A deleted checkpoint stops being one at once; its files go while training goes on."""
    gate = threading.Event()
    remove = LocalStore.delete

    def held_back(store, key=""):
        assert gate.wait(60)
        remove(store, key)

    monkeypatch.setattr(LocalStore, "delete", held_back)
    d = os.fspath(tmp_path)
    m = jc.CheckpointManager(d, max_to_keep=1)
    m.save(1, tree_of(1))
    m.save(2, tree_of(2))
    m._pending[-1].handle.wait()
    m.save(3, tree_of(3))  # records steps 1 and 2: step 1 is deleted, its files held back
    assert m.steps == [2] and on_disk(d)[0][0] == 2
    assert jc.latest_checkpoint(d) == f"{d}/ckpt-2"
    assert [n for n in on_disk(d)[1] if _storage.is_debris(n)]  # renamed, not yet removed
    gate.set()
    m.wait_until_finished()
    assert m.steps == [3] and on_disk(d) == ([3], ["checkpoint"])


@pytest.mark.parametrize("mode, best", [("min", [3, 5]), ("max", [1, 4])])
def test_best_metric_keeps_the_best_and_the_newest(tmp_path, mode, best):
    losses = {1: 9.0, 2: 5.0, 3: 1.0, 4: 7.0, 5: 2.0, 6: 6.0}
    m = jc.CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", best_mode=mode)
    for step, loss in losses.items():
        m.save(step, tree_of(step), metrics={"loss": np.float32(loss)})
    m.close()
    assert m.steps == sorted({*best, 6}) == on_disk(tmp_path)[0]
    assert m.best_step == best[0]
    assert m.metrics(best[0]) == {"loss": losses[best[0]]}
    saved = {c["step"]: c["metrics"] for c in index_of(tmp_path)["checkpoints"]}
    assert saved == {s: {"loss": losses[s]} for s in m.steps}
    # A new manager ranks from the index: the next save with a worse loss drops the newest.
    m2 = jc.CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", best_mode=mode)
    assert m2.best_step == best[0]
    m2.save(7, tree_of(7), metrics={"loss": 5.5})
    m2.close()
    assert m2.steps == sorted({*best, 7})


def test_nan_metric_ranks_last(tmp_path):
    m = jc.CheckpointManager(tmp_path, max_to_keep=1, best_metric="loss", async_save=False)
    m.save(1, tree_of(1), metrics={"loss": 3.0})
    m.save(2, tree_of(2), metrics={"loss": float("nan")})
    m.save(3, tree_of(3), metrics={"loss": 4.0})
    assert m.steps == [1, 3] and m.best_step == 1


def _set_saved_time(path, t):
    edit_metadata(path, "zarr.json", lambda m: m["attributes"]["jaxckpt"].update(time=t))


def test_keep_every_n_hours(tmp_path):
    d = os.fspath(tmp_path)
    with jc.CheckpointManager(d, max_to_keep=None) as m:
        for step in range(1, 7):
            m.save(step, tree_of(step))
    # Steps written hours apart: the times are rebuilt from each checkpoint's metadata.
    t0 = time.time() - 10 * 3600
    for step, hours in zip(range(1, 7), [0, 0.5, 1.5, 2.2, 3.0, 4.5], strict=True):
        _set_saved_time(f"{d}/ckpt-{step}", t0 + hours * 3600)
    os.remove(os.path.join(d, "checkpoint"))
    m = jc.CheckpointManager(d, max_to_keep=1, keep_every_n_hours=2, async_save=False)
    assert [c["time"] for c in index_of(d)["checkpoints"]][0] == t0
    m.save(7, tree_of(7))
    # The oldest (hour 0), the first at least 2 h later (2.2), then 2 h after that (4.5), newest.
    assert m.steps == [1, 4, 6, 7] == on_disk(d)[0]


def test_save_interval_steps_and_force(tmp_path):
    m = jc.CheckpointManager(tmp_path, save_interval_steps=10, max_to_keep=None, async_save=False)
    assert [m.should_save(s) for s in (0, 5, 10, 11, 20)] == [True, False, True, False, True]
    saved = [s for s in range(1, 31) if m.save(s, tree_of(s))]
    assert saved == [10, 20, 30] and m.steps == [10, 20, 30]
    assert m.save(33, tree_of(33), force=True) is True
    assert m.steps == [10, 20, 30, 33]
    assert m.save(np.int64(40), tree_of(40)) is True and m.latest_step == 40


@pytest.mark.parametrize("async_save", [False, True])
def test_saving_an_existing_step_is_an_error(tmp_path, async_save):
    d = os.fspath(tmp_path)
    m = jc.CheckpointManager(d, async_save=async_save)
    m.save(5, tree_of(5))
    msg = (
        f"Step 5 is already saved (or being saved) in {d} ({d}/ckpt-5); a manager never "
        "overwrites a checkpoint. "
        "Fix: save under a new step, or restore from this one to continue the run."
    )
    assert m.save(5, tree_of(6)) is False  # should_save(5) is False: no error without force
    with pytest.raises(jc.CheckpointExistsError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        m.save(5, tree_of(6), force=True)
    m.close()
    with pytest.raises(FileExistsError, match=r"Step 5 is already saved \(or being saved\)"):
        jc.CheckpointManager(d).save(5, tree_of(6), force=True)
    assert_tree_equal(m.restore(5), tree_of(5))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep must be a positive int or None, not 0"):
        jc.CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="save_interval_steps must be a positive int, not None"):
        jc.CheckpointManager(tmp_path, save_interval_steps=None)
    with pytest.raises(ValueError, match="keep_every_n_hours must be a positive number of hours"):
        jc.CheckpointManager(tmp_path, keep_every_n_hours=-1)
    with pytest.raises(ValueError, match='best_mode must be "min" or "max", not \'lowest\''):
        jc.CheckpointManager(tmp_path, best_mode="lowest")
    with pytest.raises(TypeError):
        jc.CheckpointManager(tmp_path).save(1.5, tree_of(1))


def test_restore(tmp_path):
    d = os.fspath(tmp_path)
    m = jc.CheckpointManager(d)
    with pytest.raises(
        jc.CheckpointNotFoundError,
        match=f"{d} holds no committed checkpoint to "
        "restore. Fix: check the directory, or start from scratch",
    ):
        m.restore()
    for step in (1, 2):
        m.save(step, tree_of(step), metrics={"loss": 1.0 / step})
    assert_tree_equal(m.restore(), tree_of(2))  # waits for the save in flight
    target = {"w": jax.numpy.zeros((2, 3), jax.numpy.bfloat16), "step": 0}
    out = m.restore(1, target)
    assert out["w"].dtype == jax.numpy.bfloat16 and out["step"] == 1
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), tree_of(1)["w"])
    assert_tree_equal(
        m.restore(1, {"w": np.zeros((2, 3), np.float32)}, partial=True), {"w": tree_of(1)["w"]}
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"Step 7 has no committed checkpoint in .*; its "
        r"steps are \[1, 2\]\. Fix: pick one of those steps, or step=None",
    ):
        m.restore(7)
    assert jc.restore(f"{d}/ckpt-2", None)["step"] == 2
    assert jc.open(f"{d}/ckpt-2").metrics == {"loss": 0.5}


def test_index_is_rebuilt_when_missing_stale_or_damaged(tmp_path):
    d = os.fspath(tmp_path)
    with jc.CheckpointManager(d, max_to_keep=None) as m:
        for step in (1, 2, 3):
            m.save(step, tree_of(step), metrics={"loss": float(step), "acc": np.float32(0.5)})
    index = index_of(d)
    assert index["latest_step"] == 3
    assert [(c["step"], c["path"], c["metrics"]) for c in index["checkpoints"]] == [
        (1, "ckpt-1", {"loss": 1.0, "acc": 0.5}),
        (2, "ckpt-2", {"loss": 2.0, "acc": 0.5}),
        (3, "ckpt-3", {"loss": 3.0, "acc": 0.5}),
    ]

    os.remove(os.path.join(d, "checkpoint"))
    assert jc.CheckpointManager(d).steps == [1, 2, 3]
    assert index_of(d) == index  # rebuilt from the checkpoints' own metadata, times included

    shutil.rmtree(os.path.join(d, "ckpt-2"))  # the index now lists a step that is gone
    assert jc.CheckpointManager(d).steps == [1, 3]
    assert [c["step"] for c in index_of(d)["checkpoints"]] == [1, 3]

    with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write('{"checkpoints": [{"step": 1,')
    m = jc.CheckpointManager(d, max_to_keep=None)
    assert m.steps == [1, 3] and m.metrics(3) == {"loss": 3.0, "acc": 0.5}
    assert index_of(d)["latest_step"] == 3


def test_start_removes_only_debris(tmp_path):
    d = os.fspath(tmp_path)
    with jc.CheckpointManager(d) as m:
        m.save(1, tree_of(1))
    debris = ["ckpt-2.jaxckpt-tmp-0123456789ab", "checkpoint.jaxckpt-tmp-ba9876543210", "ckpt-3"]
    os.makedirs(os.path.join(d, debris[0], "w", "c"))
    open(os.path.join(d, debris[1]), "w").close()
    os.makedirs(os.path.join(d, debris[2], "w"))  # a save that wrote in place, never committed
    keep = ["notes.txt", "ckpt-04", "ckpt-x", "logs", "ckpt-5.bak"]
    for name in keep:
        if "." in name:
            open(os.path.join(d, name), "w").close()
        else:
            os.makedirs(os.path.join(d, name, "inner"))
    m = jc.CheckpointManager(d)
    assert m.steps == [1]
    assert on_disk(d) == ([1], sorted(["checkpoint", *keep]))
    assert jc.latest_checkpoint(d) == f"{d}/ckpt-1"
    assert_tree_equal(m.restore(), tree_of(1))


def test_latest_checkpoint(tmp_path):
    assert jc.latest_checkpoint(tmp_path / "absent") is None
    assert jc.latest_checkpoint(tmp_path) is None
    for step in (3, 20, 100):
        jc.save(tmp_path / f"ckpt-{step}", tree_of(step))
    os.makedirs(tmp_path / "ckpt-200")  # not committed
    os.makedirs(tmp_path / "ckpt-300.jaxckpt-tmp-0123456789ab")
    assert jc.latest_checkpoint(tmp_path) == f"{tmp_path}/ckpt-100"
    assert jc.latest_checkpoint(os.fspath(tmp_path) + "/") == f"{tmp_path}/ckpt-100"


def _break_directory(d):
    """Puts a file where the manager's directory was: the next save cannot be written."""
    shutil.rmtree(d)
    open(d, "w").close()


def _repair_directory(d):
    os.remove(d)
    os.makedirs(d)


@pytest.mark.parametrize(
    "surfaces_from", ["save", "wait_until_finished", "close", "with", "restore"]
)
def test_an_async_error_is_never_lost(tmp_path, surfaces_from):
    d = os.fspath(tmp_path / "run")
    m = jc.CheckpointManager(d)
    _break_directory(d)
    assert m.save(1, tree_of(1)) is True  # the failure happens in the background
    while not m._pending[0].handle.done():
        time.sleep(0.01)
    _repair_directory(d)
    msg = rf"The asynchronous save of step 1 to {d}/ckpt-1 failed: .*That step was not saved"
    with pytest.raises(jc.CheckpointError, match=msg) as info:
        if surfaces_from == "save":
            m.save(2, tree_of(2))
        elif surfaces_from == "with":
            with m:
                pass
        else:
            getattr(m, surfaces_from)()
    assert isinstance(info.value.__cause__, OSError)
    m.close()  # raised once, then the manager goes on
    assert m.save(2, tree_of(2)) is True
    m.close()
    assert m.steps == [2] and on_disk(d) == ([2], ["checkpoint"])


def test_skipped_saves_surface_an_async_error(tmp_path):
    d = os.fspath(tmp_path / "run")
    m = jc.CheckpointManager(d, save_interval_steps=10)
    _break_directory(d)
    m.save(10, tree_of(10))
    while not m._pending[0].handle.done():
        time.sleep(0.01)
    _repair_directory(d)
    with pytest.raises(jc.CheckpointError, match="The asynchronous save of step 10"):
        m.save(11, tree_of(11))
    assert m.save(12, tree_of(12)) is False


def test_reached_preemption_is_false_on_one_process(tmp_path):
    m = jc.CheckpointManager(tmp_path)
    assert m.reached_preemption(0) is False and m.reached_preemption(100) is False
    assert repr(m) == f"CheckpointManager({os.fspath(tmp_path)!r}, steps=[])"


def test_storage_helpers(tmp_path):
    d = os.fspath(tmp_path)
    store = _storage.at(d)
    assert store.child("absent").names() == []
    store.write_atomic("f", b"one")
    store.write_atomic("f", b"two")
    assert store.read("f") == b"two" and store.read("g") is None
    assert store.names() == ["f"]
    jc.save(f"{d}/ckpt-1", tree_of(1))
    debris = store.child("ckpt-1").retire()
    assert _storage.is_debris(os.path.basename(debris.root)) and not jc.latest_checkpoint(d)
    debris.delete()
    assert store.child("ckpt-1").retire() is None  # already gone: nothing to do
    store.delete("f")
    store.delete("f")
    assert store.names() == []
    assert _storage.join(tmp_path, "x") == f"{d}/x"


def test_a_script_that_forgets_close_still_commits_its_last_save(tmp_path):
    script = (
        "import numpy as np, jaxckpt as jc\n"
        f"m = jc.CheckpointManager({os.fspath(tmp_path)!r}, max_to_keep=1)\n"
        "m.save(1, {'w': np.zeros(3)})\n"
        "m.save(2, {'w': np.arange(2**20, dtype=np.float32)})\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    m = jc.CheckpointManager(tmp_path)
    assert m.steps == [2] and on_disk(tmp_path) == ([2], ["checkpoint"])
    np.testing.assert_array_equal(m.restore()["w"], np.arange(2**20, dtype=np.float32))


def test_the_docs_example_runs_and_resumes(tmp_path, monkeypatch, capsys):
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "manager.md")).read()
    example = docs.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run resumes at step 100 and has nothing left to do
        exec(compile(example, "docs/manager.md", "exec"), {})
        assert capsys.readouterr().out == "[80, 90, 100]\n"
    assert index_of(tmp_path / "run")["latest_step"] == 100
    w = np.zeros(3, np.float32)
    for _ in range(100):
        w = w - 0.1 * np.ones(3, np.float32)
    np.testing.assert_array_equal(jc.restore("run/ckpt-100")["w"], w)


def test_the_manager_touches_files_only_through_storage():
    """So that _storage alone decides how a directory is listed, written and deleted (S3, GCS)."""
    import ast

    package = os.path.dirname(jc.manager.__file__)
    modules = sorted(f for f in os.listdir(package) if f.endswith(".py"))
    assert "checkpoint_manager.py" in modules and "steps.py" in modules, modules
    used = set()
    nodes = [n for m in modules for n in ast.walk(ast.parse(open(os.path.join(package, m)).read()))]
    for node in nodes:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in ("os", "shutil", "pathlib"):
                used.add(f"{node.value.id}.{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", "the manager opens a file itself"
    assert used <= {"os.fspath", "os.PathLike"}, used


def test_retention_deletes_on_a_worker_that_stays(tmp_path, monkeypatch):
    """Saving every step past max_to_keep deletes a checkpoint at each save: its files go on
    the manager's one worker, kept for the next deletion. A thread started per deletion kept
    the save call waiting until the new thread ran (35-70 ms while a save was writing)."""
    names = []

    def remove(store, key=""):
        names.append(threading.current_thread().name)
        return real(store, key)

    real = LocalStore.delete
    monkeypatch.setattr(LocalStore, "delete", remove)
    with jc.CheckpointManager(tmp_path, max_to_keep=1) as m:
        m.save(0, tree_of(0))
        m.save(1, tree_of(1))
        m.wait_until_finished()
        workers = set(_runtime.pool("manager").threads)
        for step in range(2, 6):
            m.save(step, tree_of(step))
            m.wait_until_finished()
        assert set(_runtime.pool("manager").threads) == workers  # no thread started
    assert m.steps == [5] and sorted(os.listdir(tmp_path)) == [
        ".jaxckpt-writer",
        "checkpoint",
        "ckpt-5",
    ]
    assert len(names) == 5 and all(n.startswith("jaxckpt-manager") for n in names), names


def test_a_failed_index_rewrite_is_raised_and_the_checkpoints_stay(tmp_path):
    """The index is rewritten in the background (async_save): its failure is raised by the
    next call that waits, as a CheckpointError naming the index; the step it followed stays
    committed and the next save writes the index again."""
    d = os.fspath(tmp_path / "run")
    m = jc.CheckpointManager(d)
    m.save(1, tree_of(1))
    m.wait_until_finished()
    os.remove(os.path.join(d, "checkpoint"))
    os.mkdir(os.path.join(d, "checkpoint"))  # the index cannot replace a directory
    m.save(2, tree_of(2))
    with pytest.raises(jc.CheckpointError, match=r"failed rewriting its index .*/checkpoint"):
        m.wait_until_finished()
    assert m.steps == [1, 2]
    os.rmdir(os.path.join(d, "checkpoint"))
    m.save(3, tree_of(3))
    m.close()
    assert [c["step"] for c in index_of(d)["checkpoints"]] == [1, 2, 3]
    assert jc.CheckpointManager(d).steps == [1, 2, 3]


def test_a_step_of_both_kinds_without_an_index_opens(tmp_path):
    """A run holding ckpt-2 and an Orbax step 2, without an index: the manager read ckpt-2's
    entry by asking for the step's path before it knew its own steps (an AttributeError)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    run = tmp_path / "run"
    with ocp.CheckpointManager(run) as mgr:
        mgr.save(2, args=ocp.args.StandardSave({"w": np.full(2, 2.0, np.float32)}))
        mgr.wait_until_finished()
    jc.save(run / "ckpt-2", {"w": np.full(2, 5.0, np.float32)}, step=2, metrics={"loss": 0.5})
    assert not os.path.exists(run / _run.INDEX)
    with jc.CheckpointManager(run, async_save=False) as m:
        assert m.steps == [2] and m.metrics(2) == {"loss": 0.5}
        np.testing.assert_array_equal(m.restore(2)["w"], [5.0, 5.0])
