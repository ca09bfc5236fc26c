"""A file system that refuses a save gets a sentence naming the checkpoint and the fix.

Read-only, permission denied, a path under a file, a name too long, a directory removed during
the save: each a ``jc.CheckpointError`` (also an ``OSError`` carrying the errno) naming the
checkpoint's own path, never the temporary directory; nothing is committed and the earlier
checkpoints stay intact.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from core_helpers import assert_tree_equal

import jaxckpt as jc
from jaxckpt.checkpoint import write as _write

TREE = {"w": np.arange(12.0).reshape(3, 4), "b": np.ones(5, np.float32)}
READ_ONLY = (
    "its file system is read-only. Fix: save to a writable directory, or remount that file "
    "system read-write."
)


def _under(path, root):
    return os.path.abspath(os.fspath(path)).startswith(root + os.sep)


def _inject(monkeypatch, root, code):
    """Every call that writes under ``root`` fails with ``code``, as the kernel would say it."""

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def mkdir(path, *a, real=os.mkdir, **k):
        return refuse(path) if _under(path, root) else real(path, *a, **k)

    def os_open(path, flags, *a, real=os.open, **k):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        return refuse(path) if writes and _under(path, root) else real(path, flags, *a, **k)

    def py_open(file, mode="r", *a, real=builtins.open, **k):
        writes = isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+")
        return refuse(file) if writes and _under(file, root) else real(file, mode, *a, **k)

    def rename(src, dst, *a, real=os.rename, **k):
        return refuse(dst) if _under(dst, root) else real(src, dst, *a, **k)

    def replace(src, dst, *a, real=os.replace, **k):
        return refuse(dst) if _under(dst, root) else real(src, dst, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)


@contextlib.contextmanager
def read_only(path, monkeypatch):
    """``path`` read-only: a read-only bind mount of it (root ignores file modes); where mount
    is unavailable, the os calls that write under it raise EROFS instead."""
    path = os.fspath(path)
    try:
        subprocess.run(["mount", "--bind", path, path], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        with monkeypatch.context() as m:
            _inject(m, path, errno.EROFS)
            yield
        return
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", path], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", path], check=True)


@pytest.fixture
def run(tmp_path):
    """A directory holding one committed checkpoint, ckpt-1."""
    d = tmp_path / "run"
    d.mkdir()
    jc.save(d / "ckpt-1", TREE, step=1)
    return os.fspath(d)


def _intact(run, names=("ckpt-1",)):
    assert sorted(os.listdir(run)) == sorted(names)  # nothing committed, no debris
    assert_tree_equal(jc.restore(os.path.join(run, "ckpt-1")), TREE)


def _save(kind, path):
    if kind == "sync":
        return jc.save(path, TREE)
    return jc.save_async(path, TREE).wait()


# ---------------------------------------------------------------------------- read-only


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_read_only_disk(run, monkeypatch, kind):
    with read_only(run, monkeypatch):
        with pytest.raises(jc.CheckpointError) as e:
            _save(kind, f"{run}/ckpt-2")
        assert str(e.value) == f"Writing {run}/ckpt-2 failed: {READ_ONLY}"
        assert isinstance(e.value, OSError) and e.value.errno == errno.EROFS
        with pytest.raises(jc.CheckpointError, match=f"Writing {run}/sub/ckpt-2 failed: its file"):
            jc.save(f"{run}/sub/ckpt-2", TREE)
    _intact(run)


@pytest.mark.parametrize("async_save", [False, True])
def test_read_only_disk_under_a_manager(run, monkeypatch, async_save):
    m = jc.CheckpointManager(run, async_save=async_save)
    assert m.steps == [1]
    with read_only(run, monkeypatch):
        if async_save:
            m.save(2, TREE)
            with pytest.raises(jc.CheckpointError) as e:
                m.wait_until_finished()
            assert str(e.value).startswith(
                f"The asynchronous save of step 2 to {run}/ckpt-2 failed: Writing {run}/ckpt-2 "
                f"failed: {READ_ONLY[:-1]}. That step was not saved; earlier checkpoints are "
                "intact."
            )
        else:
            with pytest.raises(jc.CheckpointError) as e:
                m.save(2, TREE)
            assert str(e.value) == f"Writing {run}/ckpt-2 failed: {READ_ONLY}"
    assert m.steps == [1]
    _intact(run, ["ckpt-1", "checkpoint"])


def test_manager_directory_on_a_read_only_disk(tmp_path, monkeypatch):
    with read_only(tmp_path, monkeypatch):
        with pytest.raises(jc.CheckpointError) as e:
            jc.CheckpointManager(tmp_path / "run")
    assert str(e.value) == f"Writing {tmp_path}/run failed: {READ_ONLY}"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("async_save", [False, True])
def test_the_index_write_refused(run, monkeypatch, async_save):
    """The checkpoint commits; the index rewrite fails naming the index, not its temporary
    file; a new manager rebuilds the stale index from the checkpoints."""
    m = jc.CheckpointManager(run, async_save=async_save)
    real = builtins.open

    def py_open(file, mode="r", *a, **k):
        if os.path.basename(os.fspath(file)).startswith("checkpoint.jaxckpt-tmp-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
        return real(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", py_open)
    with pytest.raises(jc.CheckpointError) as e:
        m.save(2, TREE)
        m.wait_until_finished()
    message = f"Writing {run}/checkpoint failed: {READ_ONLY}"
    if async_save:
        assert f"failed rewriting its index {run}/checkpoint: {message}" in str(e.value)
    else:
        assert str(e.value) == message
    assert ".jaxckpt-tmp-" not in str(e.value)
    monkeypatch.undo()
    assert jc.CheckpointManager(run).steps == [1, 2]
    assert sorted(os.listdir(run)) == [".jaxckpt-writer", "checkpoint", "ckpt-1", "ckpt-2"]


# ---------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_permission_denied(run, monkeypatch, kind):
    # Root ignores file modes: the write calls fail as they would for another user.
    with monkeypatch.context() as m:
        _inject(m, run, errno.EACCES)
        with pytest.raises(jc.CheckpointError) as e:
            _save(kind, f"{run}/ckpt-2")
    assert str(e.value) == (
        f"Writing {run}/ckpt-2 failed: permission denied. Fix: give the user running this "
        f"write access to {run}, or save elsewhere."
    )
    assert e.value.errno == errno.EACCES
    _intact(run)


def test_a_directory_that_cannot_be_listed(run, monkeypatch):
    """The check that the path is free (an empty directory may be saved into) fails too."""
    os.mkdir(f"{run}/ckpt-2")
    real = os.listdir

    def listdir(path="."):
        if os.fspath(path) == f"{run}/ckpt-2":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(jc.CheckpointError, match=f"Writing {run}/ckpt-2 failed: permission denied"):
        jc.save(f"{run}/ckpt-2", TREE)


# ---------------------------------------------------------------------------- bad paths


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("below", ["", "/sub"])
def test_a_path_under_a_file(run, kind, below):
    (open(f"{run}/notes", "w")).write("mine")
    target = f"{run}/notes{below}/ckpt-2"
    with pytest.raises(jc.CheckpointError) as e:
        _save(kind, target)
    assert str(e.value) == (
        f"Writing {target} failed: {run}/notes is a file, not a directory. Fix: choose a path "
        "whose parents are directories, or move that file away."
    )
    _intact(run, ["ckpt-1", "notes"])
    assert open(f"{run}/notes").read() == "mine"


@pytest.mark.parametrize("directory", ["notes", "notes/run"])
def test_a_manager_under_a_file(run, directory):
    (open(f"{run}/notes", "w")).write("mine")
    with pytest.raises(jc.CheckpointError) as e:
        jc.CheckpointManager(f"{run}/{directory}")
    assert str(e.value) == (
        f"Writing {run}/{directory} failed: {run}/notes is a file, not a directory. Fix: choose "
        "a path whose parents are directories, or move that file away."
    )


@pytest.mark.parametrize("n", [300, 240])  # 240 fits, but not the save's temporary name
def test_a_name_too_long(run, n):
    name = "n" * n
    with pytest.raises(jc.CheckpointError) as e:
        jc.save(f"{run}/{name}", TREE)
    assert str(e.value) == (
        f"Writing {run}/{name} failed: the name '{'n' * 40}...' is {n} bytes, too long for the "
        "file system (most allow 255 bytes per name, and a save first writes under a name 25 "
        "bytes longer). Fix: use a shorter name."
    )
    assert e.value.errno == errno.ENAMETOOLONG
    _intact(run)


# ---------------------------------------------------------------------------- removed meanwhile


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_directory_removed_during_a_save(run, monkeypatch, kind):
    """A cleanup job removes the save's directory after its files were written."""
    real = _write.durable

    def removed_then_durable(root):
        shutil.rmtree(root)
        real(root)

    monkeypatch.setattr(_write, "durable", removed_then_durable)
    with pytest.raises(jc.CheckpointError) as e:
        _save(kind, f"{run}/ckpt-2")
    assert re.fullmatch(
        rf"The save to {run}/ckpt-2 lost its directory {run}/ckpt-2\.jaxckpt-tmp-\w+ before its "
        r"commit: something else deleted the save's files while it was writing\. Nothing was "
        r"committed; earlier checkpoints are intact\. Fix: save again, and stop whatever "
        r"deletes a save's temporary files while it writes\.",
        str(e.value),
    ), str(e.value)
    assert e.value.errno == errno.ENOENT
    _intact(run)
