"""The storage conformance suite: each call of :class:`jaxckpt.storage.Store` keeps its contract
on every store (a local directory, TensorStore's ``memory://``, S3 on moto, GCS on
fake-gcs-server), as zarr-python's store tests do. A new store passes this suite first."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import servers

import jaxckpt as jc
from jaxckpt import storage
from jaxckpt.storage import arrays
from jaxckpt.storage.kvstore import KvStore
from jaxckpt.storage.local import LocalStore

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["local", "memory", "s3", "gcs"]


@pytest.fixture(params=KINDS)
def store(request, tmp_path) -> storage.Store:
    """A fresh, empty location of each kind (nothing written there yet)."""
    run = uuid.uuid4().hex[:10]
    if request.param == "local":
        return storage.at(str(tmp_path / run))
    if request.param == "memory":
        return storage.at(f"memory://conformance/{run}")
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return storage.at(f"s3://{servers.BUCKET}/{run}")
    request.getfixturevalue("gcs_env")
    return storage.at(f"gs://{servers.BUCKET}/{run}")


def _dead_owner() -> bytes:
    """A ``PENDING`` record naming a process of this host that has ended."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(p.stdout)
    return json.dumps({"host": socket.gethostname(), "pid": pid, "time": 0.0}).encode()


def _committed(store: storage.Store, files: dict[str, bytes]) -> storage.Store:
    """A checkpoint ``store/ckpt`` holding ``files``, saved as the commit protocol says."""
    final = store.child("ckpt")
    tmp = final.temporary()
    lock = tmp.begin()
    try:
        tmp.write_many(files)
        tmp.make_durable()
        assert tmp.missing(list(files)) == []
        tmp.write_durable(storage.COMMIT, b"{}")
        tmp.commit(final)
    finally:
        lock.release()
    return final


# ---------------------------------------------------------------------------- picking a store


def test_at_picks_the_store_by_the_location_alone():
    assert isinstance(storage.at("/tmp/run"), LocalStore)
    assert isinstance(storage.at("relative/run"), LocalStore)
    for url in ("s3://b/run", "gs://b/run", "memory://m/run"):
        assert isinstance(storage.at(url), KvStore)
    assert storage.normalize("s3://b//run/") == "s3://b/run"
    with pytest.raises(ValueError, match=r"uses the scheme 'ftp'.*Fix: use one of those"):
        storage.normalize("ftp://b/run")


def test_no_code_outside_storage_asks_which_store_it_holds():
    """The kind of store is chosen in storage/ only: no module above it tests a location's
    spelling (``"://"``, a scheme) nor calls an ``is_local``/``is_url`` of old."""
    for path in (ROOT / "jaxckpt").rglob("*.py"):
        if "storage" in path.relative_to(ROOT / "jaxckpt").parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in ("://", "s3://", "gs://"), (path, node.lineno)
            if isinstance(node, (ast.Attribute, ast.Name)):
                name = node.attr if isinstance(node, ast.Attribute) else node.id
                assert name not in ("is_local", "is_url", "scheme_of"), (path, node.lineno)


# ---------------------------------------------------------------------------- reading, writing


def test_an_absent_location_holds_nothing(store):
    assert not store.exists() and not store.is_dir()
    assert store.names() == [] and store.read("a") is None
    assert not store.is_committed() and not store.occupied()
    assert store.missing(["a", "b/c"]) == ["a", "b/c"]
    store.delete()  # nothing there: no error
    store.delete("a")


def test_write_read_list_and_delete(store):
    store.make_dirs()
    store.write_many({"a": b"1", "d/b": b"22", "d/e/f": b"333"})
    assert store.read("a") == b"1" and store.read("d/e/f") == b"333"
    assert store.read_many(["d/b", "zz", "a"]) == [b"22", None, b"1"]
    assert store.exists() and store.is_dir() and store.exists("d/b") and not store.exists("zz")
    assert store.keys() == ["a", "d/b", "d/e/f"]
    assert store.names() == ["a", "d"]
    assert store.child("d").keys() == ["b", "e/f"]
    assert store.missing(["a", "d/b", "zz"]) == ["zz"]
    assert store.read_json("a") == 1
    with pytest.raises(FileNotFoundError, match="zz"):
        store.read_jsons(["a", "zz"])
    store.delete("d/b")
    assert store.read("d/b") is None and store.keys() == ["a", "d/e/f"]
    store.delete("d")  # everything under it
    assert store.keys() == ["a"]
    store.delete()
    assert not store.is_dir() and store.read("a") is None


def test_a_range_read_reads_those_bytes(store):
    data = bytes(range(200))
    store.make_dirs()
    store.write_durable("r", data)
    assert store.read_range("r", 10, 5) == data[10:15]
    assert store.read_range("r", 0, 200) == data
    assert store.read_range("r", 190, 20) == data[190:]  # fewer at its end
    assert store.read_range("r", 300, 5) == b""
    assert store.read_range("missing", 0, 1) is None


def test_durable_and_atomic_writes_replace(store):
    store.make_dirs()
    store.write_durable("x", b"one")
    store.write_atomic("x", b"two")
    assert store.read("x") == b"two" and store.names() == ["x"]  # no temporary file left
    store.write_atomic("x", b"three")
    assert store.read("x") == b"three"


def test_a_zarr_array_round_trips_through_the_store(store):
    meta = arrays.array_metadata([6, 4], "int32", [3, 4])
    x = np.arange(24, dtype=np.int32).reshape(6, 4)
    out = store.open_array("w", meta, create=True).result()
    out.write(x).result()
    assert store.exists("w/zarr.json") and store.exists("w/c/1/0")
    got = store.open_array("w", meta, create=False, assume=False).result().read().result()
    np.testing.assert_array_equal(got, x)
    store.delete("w/c/1/0")
    filled = store.open_array("w", meta, create=False, fill_missing=True).result()
    np.testing.assert_array_equal(filled.read().result()[3:], 0)


# ---------------------------------------------------------------------------- the commit protocol


def test_commit_makes_the_checkpoint_appear_whole(store):
    final = _committed(store, {"zarr.json": b"{}", "w/c/0": b"abc"})
    assert final.is_committed() and final.occupied()
    assert final.read("w/c/0") == b"abc" and final.read(storage.COMMIT) == b"{}"
    assert store.names() == ["ckpt"]  # no temporary name, no PENDING beside it
    assert storage.PENDING not in final.keys()


def test_a_save_that_crashed_leaves_no_checkpoint(store):
    """begin, writes, then the writer dies before its commit: nothing is committed, the debris
    is kept while its writer lives and removed once it is gone."""
    final = store.child("ckpt")
    tmp = final.temporary()
    lock = tmp.begin()
    tmp.write_many({"zarr.json": b"{}", "w/c/0": b"abc"})
    assert not final.is_committed() and not tmp.is_committed()
    assert not tmp.remove_if_abandoned()  # its writer (this process) is alive
    # The writer dies: the kernel drops its lock; a PENDING names a process that has ended.
    lock.release()
    if tmp.exists(storage.PENDING):
        tmp.write_durable(storage.PENDING, _dead_owner())
    assert not final.is_committed()
    assert tmp.remove_if_abandoned()
    assert not tmp.is_dir() and not final.is_dir() and not final.occupied()


def test_retire_stops_a_checkpoint_being_one_then_delete_removes_it(store):
    final = _committed(store, {"zarr.json": b"{}", "w/c/0": b"abc"})
    rest = final.retire()
    assert not final.is_committed()
    assert "ckpt" not in store.names()  # no reader nor manager lists it now
    if rest is not None:  # what is left to remove later, under a debris name
        assert storage.is_debris(rest.root.rpartition("/")[2])
        rest.delete()
    assert store.names() == []
    assert final.retire() is None  # gone already: nothing to do


def test_an_occupied_location_is_refused_and_debris_is_not(store):
    final = store.child("ckpt")
    final.make_dirs()
    final.write_durable("mine.txt", b"user data")
    assert final.occupied() and not final.is_committed()
    other = store.child("other")
    tmp = other.temporary()
    tmp.begin().release()
    if tmp.exists(storage.PENDING):  # debris of a save whose writer is gone
        tmp.write_durable(storage.PENDING, _dead_owner())
        assert not other.occupied()


# ---------------------------------------------------------------------------- link


def test_link_shares_the_bytes_or_says_it_cannot(store):
    src = _committed(store, {"zarr.json": b"{}", "w/c/0": b"chunk bytes"})
    dst = store.child("next").temporary()
    lock = dst.begin()
    try:
        linked = dst.link(src.root, "w/c/0")
        assert linked is (dst.os_path() is not None)  # hard links where there are files
        assert dst.read("w/c/0") == (b"chunk bytes" if linked else None)
        assert dst.link(src.root, "w/c/9") is False  # nothing there to link
        if not linked:  # the caller writes the bytes afresh
            dst.write_many({"w/c/0": b"chunk bytes"})
        assert dst.read("w/c/0") == b"chunk bytes"
    finally:
        lock.release()
    assert src.read("w/c/0") == b"chunk bytes"


def test_link_across_kinds_of_store_is_refused(tmp_path):
    src = _committed(storage.at(str(tmp_path / "run")), {"w/c/0": b"x"})
    assert storage.at(f"memory://conformance/{uuid.uuid4().hex}").link(src.root, "w/c/0") is False
    local = storage.at(str(tmp_path / "new"))
    local.make_dirs()
    assert local.link("memory://conformance/none", "w/c/0") is False
    os.symlink(tmp_path / "run/ckpt/w/c/0", tmp_path / "run/ckpt/w/c/1")
    assert local.link(src.root, "w/c/1") is False  # a link is never what a save wrote


# ---------------------------------------------------------------------------- whole checkpoints


def test_a_checkpoint_round_trips_on_the_memory_store():
    """Save, restore and a manager run on ``memory://`` with no code of their own for it."""
    run = f"memory://conformance/{uuid.uuid4().hex[:10]}"
    tree = {"w": np.arange(300_000, dtype=np.float32), "b": np.ones(3, np.int32), "s": 7}
    path = jc.save(f"{run}/ckpt-1", tree)
    got = jc.restore(path)
    np.testing.assert_array_equal(got["w"], tree["w"])
    assert got["s"] == 7
    with jc.CheckpointManager(run, max_to_keep=1, async_save=False) as m:
        m.save(2, tree)
        m.save(3, tree)
        assert m.steps == [3]
    assert jc.latest_checkpoint(run) == f"{run}/ckpt-3"
    assert not storage.at(f"{run}/ckpt-2").is_dir()
