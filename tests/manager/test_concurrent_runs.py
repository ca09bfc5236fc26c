"""Several processes on one run: a trainer, an evaluation job, a careless second launch.

A save in progress is never taken for debris, a commit never happens over missing files, one
process at a time writes a run, and a manager opens a run it cannot or must not write.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxckpt as jc
from jaxckpt import storage as _storage
from jaxckpt.checkpoint import reader as _reader
from jaxckpt.checkpoint import write as _write
from jaxckpt.storage.local import LocalStore

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).parent.parent / "_concurrent_worker.py")
sys.path.insert(0, str(Path(__file__).parent.parent))
from _concurrent_worker import tree_of  # noqa: E402


def assert_tree_equal(got, want) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def start(directory, go, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, WORKER, str(directory), str(go), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(proc: subprocess.Popen, word: str) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith(word):
            return
    raise AssertionError(f"the worker ended before saying {word!r} (exit {proc.wait()})")


def test_a_save_in_progress_is_not_debris_to_another_process(tmp_path):
    """The issue's case: an evaluation job opens a manager while the trainer writes step 2."""
    run, go = tmp_path / "run", tmp_path / "go"
    trainer = start(run, go, "pause")
    try:
        wait_for(trainer, "writing")
        (tmp,) = glob.glob(f"{run}/ckpt-2{_storage.TMP_MARK}*")
        evaluation = jc.CheckpointManager(run)
        assert evaluation.steps == [1]
        assert os.path.isdir(tmp) and os.listdir(tmp)  # left alone: its writer is alive
        go.touch()
        out, _ = trainer.communicate(timeout=120)
    finally:
        trainer.kill()
    assert out.splitlines()[-1] == "saved", out
    assert_tree_equal(jc.restore(run / "ckpt-2"), tree_of(2))
    evaluation.reload()
    assert evaluation.steps == [1, 2]


def test_a_save_whose_files_were_removed_does_not_commit(tmp_path):
    """Whatever removes a save's temporary directory mid-write (a user's rm -rf), the save
    fails instead of committing a checkpoint with no data."""
    run, go = tmp_path / "run", tmp_path / "go"
    trainer = start(run, go, "pause")
    try:
        wait_for(trainer, "writing")
        (tmp,) = glob.glob(f"{run}/ckpt-2{_storage.TMP_MARK}*")
        while os.path.exists(tmp):  # the save's other writers may still be adding files
            shutil.rmtree(tmp, ignore_errors=True)
        go.touch()
        out, _ = trainer.communicate(timeout=120)
    finally:
        trainer.kill()
    assert out.splitlines()[-1].startswith("failed: "), out
    assert re.search(
        rf"The save to {run}/ckpt-2 lost (its directory|\d+ of the \d+ files it wrote).* before "
        r"its commit: something else deleted the save's files while it was writing\. Nothing was "
        r"committed",
        out,
    ), out
    assert not (run / "ckpt-2").exists()
    assert not glob.glob(f"{run}/*{_storage.TMP_MARK}*")
    mngr = jc.CheckpointManager(run)
    assert mngr.steps == [1]
    assert_tree_equal(mngr.restore(), tree_of(1))


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_commit_is_refused_when_a_written_file_is_missing(tmp_path, monkeypatch, how):
    tree = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(3)}
    first = jc.save(tmp_path / "a", tree)
    durable = _write.durable

    def lose_a_chunk(root: str) -> None:
        os.remove(glob.glob(f"{root}/w/c/*/*")[0])
        durable(root)

    monkeypatch.setattr(_write, "durable", lose_a_chunk)
    message = (
        rf"The save to {tmp_path}/b lost 1 of the 5 files it wrote \(e\.g\. {tmp_path}/b"
        rf"{_storage.TMP_MARK}\w+/w/c/0/0\) before its commit: something else deleted the "
        r"save's files while it was writing\. Nothing was committed; earlier checkpoints are intact\. Fix: save "
        r"again, and stop whatever deletes a save's temporary files while it writes\."
    )
    with pytest.raises(jc.CheckpointError, match=message):
        if how == "sync":
            jc.save(tmp_path / "b", tree)
        else:
            jc.save_async(tmp_path / "b", tree).wait()
    assert sorted(os.listdir(tmp_path)) == ["a"]
    assert_tree_equal(jc.restore(first), tree)


def test_debris_of_a_dead_writer_is_removed(tmp_path):
    """The other side of liveness: what a killed save left goes at the next manager's start."""
    run, go = tmp_path / "run", tmp_path / "go"
    trainer = start(run, go, "pause")
    try:
        wait_for(trainer, "writing")
        (tmp,) = glob.glob(f"{run}/ckpt-2{_storage.TMP_MARK}*")
    finally:
        trainer.kill()
        trainer.wait()
    assert os.path.isdir(tmp)
    mngr = jc.CheckpointManager(run)
    assert mngr.steps == [1] and not os.path.exists(tmp)


def test_a_second_writing_manager_is_refused_at_its_first_save(tmp_path):
    run = tmp_path / "run"
    first = start(run, tmp_path / "unused", "hold")
    try:
        wait_for(first, "ready")
        second = jc.CheckpointManager(run, async_save=False)  # opening reads, and is fine
        assert second.steps == [1]
        message = (
            rf"Another process \(process {first.pid} on [^)]+\) is writing checkpoints to "
            rf"{run}: two writing managers on one run would delete each other's checkpoints "
            r"and rewrite one index\. Fix: give each run its own directory, or open a manager "
            r"that only reads \(an evaluation job\) with CheckpointManager\(directory, "
            r"read_only=True\)\."
        )
        with pytest.raises(jc.CheckpointError, match=message):
            second.save(2, tree_of(2))
        assert not (run / "ckpt-2").exists() and second.steps == [1]
    finally:
        first.kill()
        first.wait()
    # The lock died with its process (kill -9): the run is free to write.
    assert second.save(2, tree_of(2)) is True
    assert_tree_equal(jc.restore(run / "ckpt-2"), tree_of(2))


def test_managers_of_one_process_share_the_run(tmp_path):
    """A notebook cell run twice makes a second manager while the first is still open."""
    a = jc.CheckpointManager(tmp_path, async_save=False)
    a.save(1, tree_of(1))
    b = jc.CheckpointManager(tmp_path, async_save=False)
    b.save(2, tree_of(2))
    a.close()
    b.save(3, tree_of(3))  # still held by b
    b.close()
    a.save(4, tree_of(4))  # a takes the run back after its close()
    a.close()
    assert jc.CheckpointManager(tmp_path).steps == [1, 2, 3, 4]


def _make_read_only(src: Path, dst: Path) -> bool:
    """A read-only view of ``src`` at ``dst`` (a read-only bind mount); False where this
    process may not mount."""
    dst.mkdir()
    ok = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True)
    if ok.returncode != 0:
        return False
    subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], check=True)
    return True


def test_a_read_only_copy_of_a_run_opens(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with jc.CheckpointManager(run, async_save=False) as m:
        m.save(1, tree_of(1))
        m.save(2, tree_of(2))
    os.remove(run / "checkpoint")  # a stale or missing index: the manager would rewrite it
    view = tmp_path / "view"
    mounted = _make_read_only(run, view)
    if not mounted:  # not root: the same errors a read-only file system gives
        view = run

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(LocalStore, "write_atomic", refuse)
    try:
        mngr = jc.CheckpointManager(view)
        assert mngr.steps == [1, 2] and mngr.read_only
        assert_tree_equal(mngr.restore(), tree_of(2))
        with pytest.raises(jc.CheckpointError, match=r"This manager of .*view is read-only \(.*(?i:read-only).*\): it restores, it does not save\. Fix:"):  # fmt: skip
            mngr.save(3, tree_of(3))
    finally:
        if mounted:
            subprocess.run(["umount", str(view)], check=True)
    assert sorted(os.listdir(run)) == [".jaxckpt-writer", "ckpt-1", "ckpt-2"]  # no index


def test_a_read_only_manager_writes_nothing(tmp_path):
    with jc.CheckpointManager(tmp_path, async_save=False) as m:
        m.save(1, tree_of(1))
    os.remove(tmp_path / "checkpoint")
    debris = tmp_path / f"ckpt-2{_storage.TMP_MARK}0123456789ab"
    debris.mkdir()
    before = sorted(os.listdir(tmp_path))
    mngr = jc.CheckpointManager(tmp_path, read_only=True)
    assert mngr.steps == [1]
    assert_tree_equal(mngr.restore(), tree_of(1))
    with pytest.raises(jc.CheckpointError, match=r"This manager of .* is read-only: it restores"):
        mngr.save(2, tree_of(2))
    mngr.close()
    assert sorted(os.listdir(tmp_path)) == before


def test_a_step_deleted_while_it_is_restored_is_named_as_such(tmp_path, monkeypatch):
    with jc.CheckpointManager(tmp_path, async_save=False) as m:
        m.save(1, tree_of(1))
    evaluation = jc.CheckpointManager(tmp_path, read_only=True)
    read_many = _reader.Reader.read_many

    def retired_meanwhile(self, *args, **kwargs):  # the trainer's retention, mid-restore
        shutil.rmtree(tmp_path / "ckpt-1")
        return read_many(self, *args, **kwargs)

    monkeypatch.setattr(_reader.Reader, "read_many", retired_meanwhile)
    message = (
        rf"Step 1 \({tmp_path}/ckpt-1\) was deleted while it was being restored: another "
        r"process's manager retired it \(retention\)\. Fix: mngr\.reload\(\) and restore a "
        r"newer step, e\.g\. the latest\."
    )
    with pytest.raises(jc.CheckpointNotFoundError, match=message):
        evaluation.restore(1)
