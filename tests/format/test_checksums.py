"""Metadata checksums: COMMIT records the CRC-32C of every zarr.json a save writes, and of
itself; readers check them, ``verify`` reports any mismatch; version 2 checkpoints stay readable."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import google_crc32c
import numpy as np
import pytest
import v2_trees
from core_helpers import assert_tree_equal, files_under

import jaxckpt as jc
from jaxckpt.format import checksum as _checksum
from jaxckpt.tools.cli import main

# ---------------------------------------------------------------------------- version 2


@pytest.mark.parametrize(
    ("name", "tree", "step"),
    [("v2_plain", v2_trees.plain, 10), ("v2_packed_split", v2_trees.packed_split, 20)],
)
def test_version_2_checkpoints_restore_bit_exactly(name, tree, step):
    path = os.path.join(v2_trees.HERE, name)
    with open(os.path.join(path, "COMMIT"), "rb") as f:
        assert f.read() == b"{}"  # written before COMMIT held checksums
    assert_tree_equal(jc.restore(path), tree())
    reader = jc.open(path)
    assert reader.metadata["format_version"] == 2 and reader.step == step
    assert_tree_equal(jc.restore(path, tree()), tree())
    assert main(["verify", "-q", path]) == 0


def test_version_2_damage_is_reported_not_raised_raw(tmp_path, capsys):
    """Without checksums a damaged byte may go unseen, but never escapes as a raw error."""
    path = str(shutil.copytree(os.path.join(v2_trees.HERE, "v2_plain"), tmp_path / "v2"))
    root = os.path.join(path, "zarr.json")
    data = open(root, "rb").read()
    open(root, "wb").write(data[:40] + b"\xff" + data[41:])  # was UnicodeDecodeError
    with pytest.raises(jc.CorruptCheckpointError, match=rf"{root} is not valid JSON"):
        jc.restore(path)
    assert main(["verify", "-q", path]) == 1
    assert f"DAMAGED {path}: {root} is not valid JSON" in capsys.readouterr().out
    open(root, "wb").write(b"[1, 2]")  # was AttributeError
    with pytest.raises(jc.CorruptCheckpointError, match=rf"{root} has no jaxckpt metadata"):
        jc.open(path)
    open(root, "wb").write(data.replace(b'"format_version":2', b'"format_version":"2"'))
    with pytest.raises(jc.CorruptCheckpointError, match="gives the format version '2', not a num"):
        jc.open(path)


def test_version_2_verify_still_compares_each_array_zarr_json(tmp_path, capsys):
    path = str(shutil.copytree(os.path.join(v2_trees.HERE, "v2_plain"), tmp_path / "v2"))
    os.remove(os.path.join(path, "b/zarr.json"))
    assert main(["verify", "-q", path]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"DAMAGED b: has no array metadata: {path}/b/zarr.json is missing"
    )


# ---------------------------------------------------------------------------- version 3


def _packed_tree(n=64):
    return {f"k{i}": np.arange(3, dtype=np.float32) + i for i in range(n)}


def _split_tree():
    return {
        f"b{b}": {f"l{i}": np.full((2,), b * 100 + i, np.int32) for i in range(50)}
        for b in range(24)
    }


@pytest.mark.parametrize("tree", [v2_trees.plain, _packed_tree, _split_tree])
def test_commit_holds_the_checksum_of_every_zarr_json_and_of_itself(tmp_path, tree):
    path = jc.save(tmp_path / "ckpt", tree(), step=3)
    data = open(os.path.join(path, "COMMIT"), "rb").read()
    assert _checksum.is_sealed(data)
    doc = json.loads(data)
    on_disk = sorted(f for f in files_under(path) if os.path.basename(f) == "zarr.json")
    assert doc["format_version"] == 3 and sorted(doc["zarr_json_crc32c"]) == on_disk
    for key, crc in doc["zarr_json_crc32c"].items():
        assert google_crc32c.value(open(os.path.join(path, key), "rb").read()) == crc
    assert json.loads(data[: data.rindex(b',"crc32c":')] + b"}") == {
        k: v for k, v in doc.items() if k != "crc32c"
    }
    assert google_crc32c.value(data[: data.rindex(b'"crc32c":')]) == doc["crc32c"]
    assert jc.open(path).metadata["format_version"] == 3


def test_a_changed_step_in_the_root_zarr_json_is_caught(tmp_path, capsys):
    """A single bit ("step":10 -> "step":11) silently restored step 11."""
    path = jc.save(tmp_path / "ckpt", {"w": np.ones(3)}, step=10)
    root = os.path.join(path, "zarr.json")
    data = open(root, "rb").read()
    assert data.count(b'"step":10') == 1
    open(root, "wb").write(data.replace(b'"step":10', b'"step":11'))
    damaged = (
        rf"{root} is damaged: it fails the crc32c checksum that COMMIT records for it\. Fix: "
        r"restore an earlier checkpoint, or copy this checkpoint again in full\."
    )
    for api in (jc.restore, jc.open, jc.list_variables, lambda p: jc.match(p, {"w": np.ones(3)})):
        with pytest.raises(jc.CorruptCheckpointError, match=damaged):
            api(path)
    assert main(["verify", "-q", path]) == 1
    assert capsys.readouterr().out.startswith(f"DAMAGED {path}: {root} is damaged")


def test_a_flipped_fill_value_is_reported_by_verify(tmp_path, capsys):
    """zarr-python read ones where zeros were saved, and verify said OK."""
    path = jc.save(tmp_path / "ckpt", {"z": np.zeros((64, 64)), "w": np.arange(3.0)})
    meta = os.path.join(path, "z/zarr.json")
    data = open(meta, "rb").read()
    open(meta, "wb").write(data.replace(b'"fill_value":0', b'"fill_value":1'))
    damaged = (
        f"{meta} is damaged: it fails the crc32c checksum that COMMIT records for it. Fix: "
        "restore an earlier checkpoint, or copy this checkpoint again in full."
    )
    with pytest.raises(jc.CorruptCheckpointError, match=re.escape(damaged)):
        jc.restore(path)  # an array's zarr.json is checked before the array is allocated
    assert main(["verify", "-q", path]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"DAMAGED {damaged}",
        f"DAMAGED z: {damaged}",  # the array it describes
        f"1 file and 1 of 2 arrays in {path} are damaged. Fix: restore an earlier checkpoint "
        "(`jaxckpt ls` lists them).",
    ]


def test_a_damaged_commit_is_named(tmp_path, capsys):
    path = jc.save(tmp_path / "ckpt", {"w": np.ones(3)})
    commit = os.path.join(path, "COMMIT")
    data = open(commit, "rb").read()
    for bad in (data[:-3], data.replace(b"zarr.json", b"zarr.jsom", 1), b"", b"{}"):
        open(commit, "wb").write(bad)
        with pytest.raises(jc.CorruptCheckpointError, match=rf"{commit} is damaged: "):
            jc.restore(path)
        assert main(["verify", "-q", path]) == 1
        assert capsys.readouterr().out.startswith(f"DAMAGED {path}: {commit} is damaged")
    with pytest.raises(
        jc.CorruptCheckpointError,
        match=rf"{commit} is damaged: it holds no checksums, but {path}/zarr.json says format "
        r"version 3, whose COMMIT holds them\.",
    ):
        jc.restore(path)


def test_a_newer_commit_is_refused(tmp_path):
    path = jc.save(tmp_path / "ckpt", {"w": np.ones(3)})
    commit = os.path.join(path, "COMMIT")
    doc = json.load(open(commit))
    del doc["crc32c"]
    doc["format_version"] = 4
    open(commit, "wb").write(_checksum.seal(json.dumps(doc).encode()))
    with pytest.raises(
        jc.FormatVersionError,
        match=r"was written in jaxckpt format version 4, but this jaxckpt reads versions up to 3",
    ):
        jc.open(path)


def test_a_damaged_group_file_is_named_where_it_is_read(tmp_path, capsys):
    tree = _split_tree()
    path = jc.save(tmp_path / "ckpt", tree)
    group = os.path.join(path, "b7/zarr.json")
    data = open(group, "rb").read()
    assert b'"tree"' in data  # it keeps b7's record
    open(group, "wb").write(data.replace(b"l3", b"l9", 1))  # a key renamed, still valid JSON
    damaged = rf"{group} is damaged: it fails the crc32c checksum that COMMIT records for it"
    with pytest.raises(jc.CorruptCheckpointError, match=damaged):
        jc.open(path)["b7/l3"]
    with pytest.raises(jc.CorruptCheckpointError, match=damaged):
        jc.restore(path, {"b7": {"l3": np.zeros(2, np.int32)}}, partial=True)
    with pytest.raises(jc.CorruptCheckpointError, match=damaged):
        jc.list_variables(path)
    np.testing.assert_array_equal(jc.open(path)["b6/l3"], tree["b6"]["l3"])  # others read
    assert main(["verify", "-q", path]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"DAMAGED {group} is damaged: it fails " + (
        "the crc32c checksum that COMMIT records for it. Fix: restore an earlier checkpoint, or "
        "copy this checkpoint again in full."
    )


@pytest.mark.parametrize("where", ["gap", "tail", "crc"])
def test_verify_checks_every_pack_chunk_outside_the_leaves(tmp_path, capsys, where):
    """Damage between the packed leaves, after them, or in the chunk's crc was missed."""
    tree = _packed_tree()
    path = jc.save(tmp_path / "ckpt", tree)
    chunk = os.path.join(path, "~pack/0/c/0")
    data = bytearray(open(chunk, "rb").read())
    offset = {"gap": 20, "tail": 500_000, "crc": len(data) - 2}[where]  # leaves hold 12 of 64 B
    data[offset] ^= 0x10
    open(chunk, "wb").write(bytes(data))
    assert main(["verify", "-q", path]) == 1
    assert capsys.readouterr().out.splitlines()[0] == (
        f"DAMAGED the chunk file {chunk} fails its crc32c checksum"
    )
    np.testing.assert_array_equal(jc.open(path)["k5"], tree["k5"])  # a leaf's bytes are intact


# ---------------------------------------------------------------------------- the manager's index


def _run_with_best_first(d):
    with jc.CheckpointManager(d, max_to_keep=1, best_metric="loss", async_save=False) as m:
        m.save(1, {"w": np.ones(2)}, metrics={"loss": 1.0})
        m.save(2, {"w": np.ones(2)}, metrics={"loss": 2.0})
        assert m.steps == [1, 2]
    return os.path.join(d, "checkpoint")


def _saves_step_3_keeping_the_best(d):
    m = jc.CheckpointManager(d, max_to_keep=1, best_metric="loss", async_save=False)
    assert m.best_step == 1 and m.metrics(1) == {"loss": 1.0}
    m.save(3, {"w": np.ones(2)}, metrics={"loss": 3.0})
    assert m.steps == [1, 3] and os.path.isdir(os.path.join(d, "ckpt-1"))


def test_a_damaged_index_is_rebuilt_and_the_best_kept(tmp_path, caplog):
    d = os.fspath(tmp_path)
    index = _run_with_best_first(d)
    data = open(index, "rb").read()
    assert _checksum.is_sealed(data) and json.loads(data)["jaxckpt_manager_index"] == 2
    assert data.count(b'"loss": 1.0') == 1
    open(index, "wb").write(data.replace(b'"loss": 1.0', b'"loss": 9.0'))  # the true best
    _saves_step_3_keeping_the_best(d)
    assert (
        f"jaxckpt: rebuilding the index {d}/checkpoint from the checkpoints: it is damaged (it "
        "fails its own crc32c checksum)" in caplog.messages
    )
    assert _checksum.is_sealed(open(index, "rb").read())  # rewritten


def _index_saying_loss_9_for_step_1(index, version):
    doc = json.load(open(index))
    del doc["crc32c"]
    doc["checkpoints"][0]["metrics"]["loss"] = 9.0
    doc["jaxckpt_manager_index"] = version
    body = json.dumps(doc, indent=1).encode()
    open(index, "wb").write(_checksum.seal(body) if version == 2 else body)


def test_an_index_that_disagrees_with_the_checkpoints_deletes_nothing_on_its_word(tmp_path, caplog):
    """An index intact but wrong (stale, or edited) is checked against the checkpoints' own
    metadata before retention deletes by what it says."""
    d = os.fspath(tmp_path)
    _index_saying_loss_9_for_step_1(_run_with_best_first(d), version=2)
    m = jc.CheckpointManager(d, max_to_keep=1, best_metric="loss", async_save=False)
    assert m.metrics(1) == {"loss": 9.0}  # the index's word, until retention would delete
    m.save(3, {"w": np.ones(2)}, metrics={"loss": 3.0})
    assert m.steps == [1, 3] and m.best_step == 1 and m.metrics(1) == {"loss": 1.0}
    assert any(
        re.fullmatch(
            rf"jaxckpt: the index {d}/checkpoint says step 1 has time [0-9.]+ and metrics "
            r"\{'loss': 9.0\}, but its checkpoint says [0-9.]+ and \{'loss': 1.0\}; the "
            r"checkpoint's are used\.",
            msg,
        )
        for msg in caplog.messages
    )


def test_an_index_without_a_checksum_is_rebuilt(tmp_path, caplog):
    """An older jaxckpt's index (no checksum) is rebuilt from the checkpoints."""
    d = os.fspath(tmp_path)
    _index_saying_loss_9_for_step_1(_run_with_best_first(d), version=1)
    caplog.set_level(logging.INFO, logger="jaxckpt")
    _saves_step_3_keeping_the_best(d)
    assert (
        f"jaxckpt: rebuilding the index {d}/checkpoint from the checkpoints: it has no checksum "
        "(an older jaxckpt wrote it)" in caplog.messages
    )
