"""Incremental saves: chunks unchanged since the previous checkpoint are hard-linked from it.

Every checkpoint stays complete (zarr-python reads it, deleting another never damages it);
only what is provably unchanged is linked: the same ``jax.Array`` object, or a chunk whose
BLAKE2b-128 digest matches, in a still-committed checkpoint whose file is as it was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr

import jaxckpt as jc
from jaxckpt.checkpoint import incremental as _incremental
from jaxckpt.storage import chunk_files as _chunks
from jaxckpt.tools import cli as cli

sys.path.insert(0, str(Path(__file__).parent.parent))
from _crash_worker import base_of, key_of, tree_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BACKBONE = np.arange(1 << 18, dtype=np.float32).reshape(512, 512)  # 1 MiB: its own zarr array


def ino(path) -> int:
    return os.stat(path).st_ino


def chunk_files(ckpt) -> dict[str, os.stat_result]:
    out = {}
    for root, _, files in os.walk(ckpt):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), ckpt)
            if f not in ("zarr.json", "COMMIT"):
                out[rel] = os.stat(os.path.join(root, f))
    return out


def head_of(step: int) -> jax.Array:
    return jnp.full((64, 64), step + 1, jnp.float32)


def assert_same(got, want) -> None:
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()  # bit-exact


@pytest.mark.parametrize("async_save", [False, True])
def test_every_step_restores_bit_exactly_after_rotation_deleted_the_first(tmp_path, async_save):
    backbone = jnp.asarray(BACKBONE)
    want = {}
    run = tmp_path / "run"
    with jc.CheckpointManager(run, max_to_keep=3, async_save=async_save) as mngr:
        for step in range(7):
            tree = {"backbone": backbone, "head": head_of(step), "n": np.full(5, step, np.int32)}
            mngr.save(step, tree)
            want[step] = jax.tree_util.tree_map(np.array, tree)
        mngr.wait_until_finished()
        assert mngr.steps == [4, 5, 6]
        for step in mngr.steps:
            assert_same(mngr.restore(step), want[step])
    # The backbone was written once, at step 0 (deleted since), and linked ever after.
    files = [chunk_files(run / f"ckpt-{s}") for s in (4, 5, 6)]
    assert len({f["backbone/c/0/0"].st_ino for f in files}) == 1
    assert files[0]["backbone/c/0/0"].st_nlink == 3
    assert len({f["head/c/0/0"].st_ino for f in files}) == 3  # changed each step: written
    # Deleting any checkpoint leaves the others whole.
    shutil.rmtree(run / "ckpt-5")
    for step in (4, 6):
        assert_same(jc.restore(run / f"ckpt-{step}"), want[step])


def test_zarr_python_reads_a_linked_checkpoint(tmp_path):
    backbone = jnp.asarray(BACKBONE)
    with jc.CheckpointManager(tmp_path, async_save=False) as mngr:
        for step in range(3):
            mngr.save(step, {"backbone": backbone, "head": head_of(step)})
    path = tmp_path / "ckpt-2"
    assert chunk_files(path)["backbone/c/0/0"].st_nlink == 3
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group["backbone"][...], BACKBONE)
    np.testing.assert_array_equal(group["head"][...], np.full((64, 64), 3, np.float32))


def test_a_mutated_numpy_leaf_is_written_an_unchanged_one_linked(tmp_path):
    mutated = np.arange(300_000, dtype=np.int32)
    kept = np.arange(300_000, dtype=np.int32) * 3
    with jc.CheckpointManager(tmp_path, async_save=False, max_to_keep=None) as mngr:
        mngr.save(1, {"mutated": mutated, "kept": kept})
        mutated[7] = -1  # the same object, a new value
        mngr.save(2, {"mutated": mutated, "kept": kept})
    one, two = chunk_files(tmp_path / "ckpt-1"), chunk_files(tmp_path / "ckpt-2")
    assert one["mutated/c/0"].st_ino != two["mutated/c/0"].st_ino
    assert one["kept/c/0"].st_ino == two["kept/c/0"].st_ino  # same bytes: linked by digest
    got = jc.restore(tmp_path / "ckpt-2")
    assert got["mutated"][7] == -1
    assert jc.restore(tmp_path / "ckpt-1")["mutated"][7] == 7


def test_a_changed_chunk_is_told_by_its_crc_and_not_hashed(tmp_path, monkeypatch):
    """A chunk whose CRC-32C differs from the previous one's is written without a digest; one
    that then stays the same is hashed on the next save and linked from the save after."""
    hashed = []
    blake2b = hashlib.blake2b

    def counting(data, **kw):
        hashed.append(len(data))
        return blake2b(data, **kw)

    monkeypatch.setattr(_incremental.hashlib, "blake2b", counting)
    trained = np.arange(300_000, dtype=np.int32)
    with jc.CheckpointManager(tmp_path, async_save=False, max_to_keep=None) as mngr:
        mngr.save(1, {"w": trained})  # nothing to compare with: hashed
        assert hashed == [trained.nbytes]
        trained[0] = -1
        mngr.save(2, {"w": trained})  # its CRC differs: written, not hashed
        assert len(hashed) == 1
        mngr.save(3, {"w": trained})  # the same CRC: hashed, but step 2 has no digest to match
        assert len(hashed) == 2
        mngr.save(4, {"w": trained})  # equal digests: linked
    files = [chunk_files(tmp_path / f"ckpt-{s}")["w/c/0"].st_ino for s in (1, 2, 3, 4)]
    assert len(set(files[:3])) == 3 and files[3] == files[2]
    assert jc.restore(tmp_path / "ckpt-4")["w"][0] == -1
    assert jc.restore(tmp_path / "ckpt-1")["w"][0] == 0


def test_packs_are_linked_while_their_bytes_are_unchanged(tmp_path):
    small = {f"s{i}": np.full(100, i, np.float32) for i in range(80)}  # packed (64+ leaves)
    with jc.CheckpointManager(tmp_path, async_save=False, max_to_keep=None) as mngr:
        mngr.save(1, small)
        mngr.save(2, small)
        small["s3"][0] = 42.0
        mngr.save(3, small)
    one, two, three = (chunk_files(tmp_path / f"ckpt-{s}") for s in (1, 2, 3))
    assert one["~pack/0/c/0"].st_ino == two["~pack/0/c/0"].st_ino
    assert two["~pack/0/c/0"].st_ino != three["~pack/0/c/0"].st_ino
    assert jc.restore(tmp_path / "ckpt-3")["s3"][0] == 42.0
    assert jc.restore(tmp_path / "ckpt-2")["s3"][0] == 3.0


@pytest.mark.parametrize("damage", ["rewritten", "replaced", "deleted", "checkpoint_deleted"])
def test_a_damaged_or_deleted_previous_chunk_is_not_linked(tmp_path, damage, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    backbone = jnp.asarray(BACKBONE)
    with jc.CheckpointManager(tmp_path, async_save=False, max_to_keep=None) as mngr:
        mngr.save(1, {"backbone": backbone})
        chunk = tmp_path / "ckpt-1" / "backbone" / "c" / "0" / "0"
        before = os.stat(chunk)
        if damage == "rewritten":  # in place: the same inode and size, a new time
            time.sleep(0.01)
            with open(chunk, "r+b") as f:
                f.write(b"\xff\xff\xff\xff")
        elif damage == "replaced":  # another file of the same size in its place
            data = chunk.read_bytes()
            chunk.unlink()
            chunk.write_bytes(data)
        elif damage == "deleted":
            chunk.unlink()
        else:
            shutil.rmtree(tmp_path / "ckpt-1")
        mngr.save(2, {"backbone": backbone})
    if damage == "checkpoint_deleted":
        assert (
            f"jaxckpt: the save to {tmp_path / 'ckpt-2'} writes every chunk: its base "
            f"{tmp_path / 'ckpt-1'} is no longer the committed checkpoint this process wrote"
        ) in caplog.messages
    after = chunk_files(tmp_path / "ckpt-2")["backbone/c/0/0"]
    # Written afresh: a link would share its file with ckpt-1 (two links). Not compared by
    # inode number: a file system reuses a deleted file's number for the next file it makes.
    assert after.st_nlink == 1
    if damage == "rewritten":
        assert after.st_ino != before.st_ino
    np.testing.assert_array_equal(jc.restore(tmp_path / "ckpt-2")["backbone"], BACKBONE)


def test_incremental_false_writes_everything(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    backbone = jnp.asarray(BACKBONE)
    with jc.CheckpointManager(tmp_path, async_save=False, incremental=False) as mngr:
        for step in range(3):
            mngr.save(step, {"backbone": backbone, "head": head_of(step)})
    for step in range(3):
        assert all(st.st_nlink == 1 for st in chunk_files(tmp_path / f"ckpt-{step}").values())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved ")]
    assert len(lines) == 3 and all(" written, 0 linked)" in line for line in lines)


def test_the_save_log_line_says_bytes_written_and_linked(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    backbone = jnp.asarray(BACKBONE)
    with jc.CheckpointManager(tmp_path, async_save=True) as mngr:
        for step in range(2):
            mngr.save(step, {"backbone": backbone, "head": head_of(step)})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved ")]
        if len(lines) == 2:
            break
        time.sleep(0.01)
    head, back = 64 * 64 * 4, BACKBONE.nbytes
    assert f"files ({head + back} written, 0 linked)" in lines[0]
    assert f"files ({head} written, {back} linked)" in lines[1]


def test_back_to_back_async_saves_write_the_frozen_leaf_once(tmp_path, monkeypatch):
    """A save links against the previous one even while that one is still being written."""
    gate, write_file = threading.Event(), _chunks.write_file

    def held_back(path, parts):
        assert gate.wait(60)
        return write_file(path, parts)

    monkeypatch.setattr(_chunks, "write_file", held_back)
    backbone = jnp.asarray(BACKBONE)
    with jc.CheckpointManager(tmp_path, async_save=True, max_to_keep=None) as mngr:
        for step in range(4):  # each returns while the first is still held back
            mngr.save(step, {"backbone": backbone, "head": head_of(step)})
        assert mngr.steps == []
        gate.set()
        mngr.wait_until_finished()
    inodes = {chunk_files(tmp_path / f"ckpt-{s}")["backbone/c/0/0"].st_ino for s in range(4)}
    assert len(inodes) == 1
    for step in range(4):
        np.testing.assert_array_equal(jc.restore(tmp_path / f"ckpt-{step}")["head"], step + 1)


def test_after_a_failed_save_the_next_one_writes_everything(tmp_path, monkeypatch):
    gate, write_file = threading.Event(), _chunks.write_file

    def failing(path, parts):  # the save to b fails, once the next save has been called
        if f"{os.sep}b{jc.storage.TMP_MARK}" not in path:
            return write_file(path, parts)
        assert gate.wait(60)
        raise OSError(28, "No space left on device")

    backbone = jnp.asarray(BACKBONE)
    jc.save(tmp_path / "a", {"backbone": backbone})
    monkeypatch.setattr(_chunks, "write_file", failing)
    first = jc.save_async(
        tmp_path / "b", {"backbone": backbone, "x": np.ones(3)}, base=tmp_path / "a"
    )
    second = jc.save_async(tmp_path / "c", {"backbone": backbone}, base=tmp_path / "b")
    gate.set()
    with pytest.raises(jc.StorageError):
        first.wait()
    second.wait()
    st = chunk_files(tmp_path / "c")["backbone/c/0/0"]
    assert st.st_ino != ino(tmp_path / "a" / "backbone" / "c" / "0" / "0")
    np.testing.assert_array_equal(jc.restore(tmp_path / "c")["backbone"], BACKBONE)


def test_a_leaf_deleted_after_the_call_whose_base_failed_is_an_error(tmp_path, monkeypatch):
    gate, write_file = threading.Event(), _chunks.write_file

    def failing(path, parts):  # the save to b fails, once the next save has been called
        if f"{os.sep}b{jc.storage.TMP_MARK}" not in path:
            return write_file(path, parts)
        assert gate.wait(60)
        raise OSError(28, "No space left on device")

    backbone = jnp.asarray(BACKBONE)
    jc.save(tmp_path / "a", {"backbone": backbone})
    monkeypatch.setattr(_chunks, "write_file", failing)
    first = jc.save_async(
        tmp_path / "b", {"backbone": backbone, "x": np.ones(3)}, base=tmp_path / "a"
    )
    second = jc.save_async(tmp_path / "c", {"backbone": backbone}, base=tmp_path / "b")
    backbone.delete()  # donated, say: the save linked it, so it took no snapshot
    gate.set()
    with pytest.raises(jc.StorageError):
        first.wait()
    with pytest.raises(jc.CheckpointError) as e:
        second.wait()
    assert str(e.value) == (
        f"The save to {tmp_path / 'c'} could not link the unchanged array 'backbone' from the "
        "previous checkpoint (deleted or damaged since), and the array itself was deleted "
        "(donated) after the save was called, so its bytes are gone. Nothing was committed. "
        "Fix: save again; keep a checkpoint's files in place while the next save runs."
    )
    assert not os.path.exists(tmp_path / "c")


def test_jc_save_links_from_a_base_this_process_saved(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    backbone = jnp.asarray(BACKBONE)
    a = jc.save(tmp_path / "a", {"backbone": backbone, "head": head_of(0)})
    b = jc.save(tmp_path / "b", {"backbone": backbone, "head": head_of(1)}, base=a)
    assert ino(f"{a}/backbone/c/0/0") == ino(f"{b}/backbone/c/0/0")
    assert ino(f"{a}/head/c/0/0") != ino(f"{b}/head/c/0/0")
    # A base this process holds no record of (another process's, an older run's): written.
    _incremental._records.clear()
    c = jc.save(tmp_path / "c", {"backbone": backbone}, base=b)
    assert ino(f"{c}/backbone/c/0/0") != ino(f"{b}/backbone/c/0/0")
    assert (
        f"jaxckpt: the save to {c} writes every chunk: its base {b} is no checkpoint this "
        "process saved (or its save failed)" in caplog.messages
    )
    with pytest.raises(TypeError, match=r"base must be the path of an earlier checkpoint"):
        jc.save(tmp_path / "d", {"x": np.ones(3)}, base=3)


def test_ls_shows_shared_and_own_bytes(tmp_path, capsys):
    backbone = jnp.asarray(BACKBONE)
    with jc.CheckpointManager(tmp_path, async_save=False) as mngr:
        for step in range(2):
            mngr.save(step, {"backbone": backbone, "head": head_of(step)})
    assert cli.main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STEP", "NAME", "SIZE", "SHARED", "OWN", "SAVED", "METRICS"]
    shared = BACKBONE.nbytes + 4
    for step, line in zip((0, 1), lines[1:3], strict=True):
        files = [
            os.lstat(os.path.join(r, f))
            for r, _, fs in os.walk(tmp_path / f"ckpt-{step}")
            for f in fs
        ]
        size = sum(st.st_size for st in files)
        cols = line.split()
        assert cols[:2] == [str(step), f"ckpt-{step}"]
        assert " ".join(cols[2:4]) == cli.human_bytes(size)
        assert " ".join(cols[4:6]) == cli.human_bytes(shared)
        assert " ".join(cols[6:8]) == cli.human_bytes(size - shared)
    inodes = {}
    for step in (0, 1):
        for r, _, fs in os.walk(tmp_path / f"ckpt-{step}"):
            for f in fs:
                st = os.lstat(os.path.join(r, f))
                inodes[st.st_ino] = st.st_size
    assert lines[3] == f"2 checkpoints, {cli.human_bytes(sum(inodes.values()))} on disk"
    assert cli.main(["ls", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for c in doc["checkpoints"]:
        assert c["shared_bytes"] == shared
        assert c["own_bytes"] == c["bytes"] - shared


# ---------------------------------------------------------------------------- kill -9

N = 4 * 2**20  # uint32 elements of each big leaf: 16 MiB each, and a 16 MiB frozen one


def _restores(d: str, step: int, base: np.ndarray) -> None:
    got = jc.restore(os.path.join(d, f"ckpt-{step}"))
    assert got["frozen"].tobytes() == base.tobytes()
    assert got["params"]["a"].tobytes() == (base + key_of(step)).tobytes()
    assert got["params"]["b"].tobytes() == (base ^ key_of(step)).tobytes()
    want = tree_of(step, base, np.empty_like(base), np.empty_like(base))
    np.testing.assert_array_equal(got["params"]["small"], want["params"]["small"])
    assert got["step"] == step


@pytest.mark.parametrize("mode", ["sync+frozen", "async+frozen"])
def test_sigkill_during_incremental_saves_loses_nothing_committed(tmp_path, mode):
    d = str(tmp_path / "run")
    rng = random.Random()
    base = base_of(N)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_crash_worker.py"), d, mode, str(N)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            lines = []
            deadline = time.monotonic() + 120
            assert proc.stdout is not None
            # "saved STEP TIME LATEST": an async save returned once snapshotted; LATEST is the
            # newest step known committed. Wait for three saves, one of them committed.
            committed = None
            while sum(line.startswith("saved") for line in lines) < 3 or committed is None:
                line = proc.stdout.readline()
                assert line and time.monotonic() < deadline, "".join(lines)
                lines.append(line)
                if line.startswith("saved") and line.split()[3] != "None":
                    committed = int(line.split()[3])
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        mngr = jc.CheckpointManager(d, max_to_keep=2)  # removes the debris
        names = os.listdir(d)
        assert not [n for n in names if jc.storage.TMP_MARK in n], names
        assert mngr.steps and mngr.steps[-1] >= committed, lines
        for step in mngr.steps:
            _restores(d, step, base)
        mngr.close()
        start = int(lines[0].split()[1])  # the first step this worker saved
        if len(mngr.steps) == 2 and mngr.steps[0] >= start:  # the newer linked the older's
            older, newer = (chunk_files(os.path.join(d, f"ckpt-{s}")) for s in mngr.steps)
            assert older["frozen/c/0"].st_ino == newer["frozen/c/0"].st_ino


# ---------------------------------------------------------------------------- object stores


@pytest.fixture(params=["s3", "gcs"])
def store(request, monkeypatch, tmp_path_factory):
    import servers

    bucket = "jaxckpt-inc"
    if request.param == "s3":
        srv = servers.start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
        servers.create_s3_bucket(srv.url, bucket)
        for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(k, raising=False)
        for k, v in servers.DUMMY_AWS.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", srv.url)
        url = f"s3://{bucket}/{uuid.uuid4().hex[:10]}"
    else:
        srv = servers.start_fake_gcs()
        servers.create_gcs_bucket(srv.url, bucket)
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", srv.url)
        monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        url = f"gs://{bucket}/{uuid.uuid4().hex[:10]}"
    yield url
    jc.set_storage_options("s3" if request.param == "s3" else "gs")
    srv.stop()


def test_object_stores_write_in_full_and_restore_every_step(store, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    backbone = jnp.asarray(BACKBONE)
    want = {}
    with jc.CheckpointManager(store, max_to_keep=2) as mngr:
        for step in range(3):
            tree = {"backbone": backbone, "head": head_of(step)}
            mngr.save(step, tree)
            want[step] = jax.tree_util.tree_map(np.array, tree)
        mngr.wait_until_finished()
        assert mngr.steps == [1, 2]
        for step in mngr.steps:
            assert_same(mngr.restore(step), want[step])
    assert not [m for m in caplog.messages if "linked" in m]  # nothing is linked there
    assert jc.restore(f"{store}/ckpt-2")["backbone"].tobytes() == BACKBONE.tobytes()
    assert re.search(r"ckpt-2", jc.latest_checkpoint(store) or "")


def test_a_save_whose_base_is_still_being_written_and_does_not_wait_writes_everything(
    tmp_path, monkeypatch
):
    """jc.save does not wait for an async save in flight: it cannot link from it, so writes."""
    gate, write_file = threading.Event(), _chunks.write_file

    def held_back(path, parts):  # the async save to a waits
        if f"{os.sep}a{jc.storage.TMP_MARK}" in path:
            assert gate.wait(60)
        return write_file(path, parts)

    monkeypatch.setattr(_chunks, "write_file", held_back)
    backbone = jnp.asarray(BACKBONE)
    handle = jc.save_async(tmp_path / "a", {"backbone": backbone})
    b = jc.save(tmp_path / "b", {"backbone": backbone}, base=tmp_path / "a")
    gate.set()
    a = handle.wait()
    assert ino(f"{a}/backbone/c/0/0") != ino(f"{b}/backbone/c/0/0")
    for path in (a, b):
        np.testing.assert_array_equal(jc.restore(path)["backbone"], BACKBONE)
