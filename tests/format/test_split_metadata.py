"""Split structure records: a big tree's record kept in the zarr.json of its groups.

The root zarr.json of a big tree keeps stubs (``"split": true``) for its big subtrees, whose
records live in their group's zarr.json; lookups read only the files on their path.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import zarr
from core_helpers import assert_tree_equal, rewrite_metadata

import jaxckpt as jc

DTYPES = (np.float32, np.int8, np.bool_)


def _leaf(n: int) -> np.ndarray:
    return (np.arange(3) + n).astype(DTYPES[n % 3])


def _big_tree() -> dict:
    """3,000 small leaves: "enc" splits twice (enc, then its blocks), "dec" is a list."""
    enc = {
        f"b{i}": {
            f"s{j}": {f"w{k}": _leaf(100 * i + 10 * j + k) for k in range(10)} for j in range(10)
        }
        for i in range(10)
    }
    enc["b0"]["big"] = np.arange(300_000, dtype=np.float32)  # over 1 MiB: its own zarr array
    dec = [{f"w{k}": _leaf(1000 + 100 * i + k) for k in range(100)} for i in range(20)]
    return {"enc": enc, "dec": dec, "head": (np.float32(2.5), 7, "name")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tree = _big_tree()
    return str(jc.save(tmp_path_factory.mktemp("split") / "ckpt", tree)), tree


def _attrs(path: str, group: str = "") -> dict:
    with open(os.path.join(path, group, "zarr.json")) as f:
        return json.load(f)["attributes"]


def _spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


def _abstract(tree):
    arrays = (np.ndarray, np.generic)
    return jax.tree_util.tree_map(lambda x: _spec(x) if isinstance(x, arrays) else x, tree)


def _host(tree):
    arrays = (jax.Array, np.ndarray, np.generic)
    return jax.tree_util.tree_map(lambda x: np.asarray(x) if isinstance(x, arrays) else x, tree)


def test_big_tree_root_record_is_small_and_keeps_stubs(saved):
    path, _ = saved
    assert os.path.getsize(os.path.join(path, "zarr.json")) < 2048
    root = _attrs(path)["jaxckpt"]["tree"]
    kids = {k: c for _, k, c in root["c"]}
    assert kids["enc"] == {"t": "dict", "split": True}
    assert kids["dec"] == {"t": "list", "split": True}
    assert kids["head"]["t"] == "tuple" and "c" in kids["head"]  # small: stays inline
    enc = _attrs(path, "enc")["jaxckpt"]["tree"]  # over 64 KiB itself: its blocks moved again
    assert all(c == {"t": "dict", "split": True} for _, _, c in enc["c"])
    b3 = _attrs(path, "enc/b3")["jaxckpt"]["tree"]
    assert [k for _, k, _ in b3["c"]] == [f"s{j}" for j in range(10)]
    assert "jaxckpt" not in _attrs(path, "enc/b3/s1")  # small groups keep no record
    assert os.path.getsize(os.path.join(path, "enc/b3/zarr.json")) < 16 * 1024


def test_small_tree_writes_no_stub(tmp_path):
    tree = {f"b{i}": {f"w{k}": _leaf(k) for k in range(20)} for i in range(10)}
    path = str(jc.save(tmp_path / "c", tree))
    assert '"split"' not in open(os.path.join(path, "zarr.json")).read()
    assert all(_attrs(path, f"b{i}") == {} for i in range(10))
    assert_tree_equal(jc.restore(path), tree)


def test_split_tree_round_trips_every_way(saved):
    path, tree = saved
    assert_tree_equal(_host(jc.restore(path, _abstract(tree))), _host(tree))
    plain = jc.restore(path)  # target=None: dicts, lists and tuples of NumPy arrays
    assert isinstance(plain["dec"], list) and isinstance(plain["head"], tuple)
    assert_tree_equal(plain, tree)
    part = jc.restore(path, {"enc": {"b7": {"s2": {"w3": _spec(_leaf(723))}}}}, partial=True)
    np.testing.assert_array_equal(np.asarray(part["enc"]["b7"]["s2"]["w3"]), _leaf(723))
    assert_tree_equal(jc.restore(path, prefix="dec/4"), tree["dec"][4])

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [jax.tree_util.keystr(kp, simple=True, separator="/") for kp, _ in flat]
    reader = jc.open(path)
    assert reader.paths == paths and len(reader) == 3004
    np.testing.assert_array_equal(reader["dec/19/w99"], _leaf(1000 + 1900 + 99))
    np.testing.assert_array_equal(reader.read("enc/b0/big", (slice(5, 9),)), np.arange(5, 9))
    assert reader["head/2"] == "name"
    assert [v[0] for v in jc.list_variables(path)] == sorted(paths)
    assert ("enc/b0/big", (300_000,), "float32") in jc.list_variables(path)

    status = jc.match(path, _abstract(tree))
    assert (status.missing, status.unused, status.mismatched) == ([], [], [])
    less = _abstract(tree)
    del less["enc"]["b9"]
    status = jc.match(path, less)
    assert status.unused == [p for p in paths if p.startswith("enc/b9/")]
    with pytest.raises(
        jc.StructureMismatchError,
        match=r"Saved leaves the target lacks \(100\):\n    \['enc'\]\['b9'\]\['s0'\]\['w0'\]  "
        r"\(saved as 'enc/b9/s0/w0'\)",
    ):
        status.assert_consumed()


def test_lookups_read_only_the_group_files_on_their_path(saved, tmp_path):
    src, tree = saved
    path = str(jc.save(tmp_path / "c", tree))
    os.remove(os.path.join(path, "enc/b5/zarr.json"))
    with open(os.path.join(path, "dec/zarr.json"), "w") as f:
        f.write("{not json")
    part = jc.restore(path, {"enc": {"b7": {"s2": {"w3": _spec(_leaf(723))}}}}, partial=True)
    np.testing.assert_array_equal(np.asarray(part["enc"]["b7"]["s2"]["w3"]), _leaf(723))
    reader = jc.open(path)
    np.testing.assert_array_equal(reader["enc/b4/s0/w1"], _leaf(401))
    assert "enc/b8/s9/w9" in reader and "enc/b8/s9/nope" not in reader
    missing = os.path.join(path, "enc", "b5", "zarr.json")
    with pytest.raises(
        jc.CorruptCheckpointError,
        match=rf"{missing} is missing: it keeps the structure record of the subtree at "
        r"\['enc'\]\['b5'\] \(split out of the root zarr.json\), so the checkpoint's metadata "
        r"is damaged. Fix: restore an earlier checkpoint",
    ):
        jc.restore(path, {"enc": {"b5": {"s0": {"w0": _spec(_leaf(500))}}}}, partial=True)
    with pytest.raises(jc.CorruptCheckpointError, match=r"enc/b5/zarr.json is missing"):
        jc.restore(path, prefix="enc")
    damaged = r"dec/zarr.json is damaged: it fails the crc32c checksum that COMMIT records for it"
    with pytest.raises(jc.CorruptCheckpointError, match=damaged):
        jc.restore(path)
    with pytest.raises(jc.CorruptCheckpointError, match=damaged):
        list(jc.open(path))


def test_a_partial_restore_reads_its_group_files_beside_the_root(saved, monkeypatch):
    """The group files on the target's paths are read together with the root's zarr.json."""
    from jaxckpt.storage.base import Store

    path, _ = saved
    batches = []
    read_jsons = Store.read_jsons
    monkeypatch.setattr(
        Store, "read_jsons", lambda s, k, *a: batches.append(k) or read_jsons(s, k, *a)
    )
    part = jc.restore(path, {"enc": {"b7": {"s2": {"w3": _spec(_leaf(723))}}}}, partial=True)
    np.testing.assert_array_equal(np.asarray(part["enc"]["b7"]["s2"]["w3"]), _leaf(723))
    assert batches == []  # no group file read waited for the root's: they went together
    jc.open(path)["enc/b7/s2/w3"]  # without a target to look ahead: a level at a time
    assert batches == [["enc/zarr.json"], ["enc/b7/zarr.json"]]


def test_a_group_file_without_its_record_is_named(saved, tmp_path):
    _, tree = saved
    path = str(jc.save(tmp_path / "c", tree))
    # Written so (checksum and all): not damage, but a record missing where the stub says.
    rewrite_metadata(
        path, "dec/zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}}
    )
    with pytest.raises(
        jc.CorruptCheckpointError,
        match=r"dec/zarr.json lacks that record: it keeps the structure record of the subtree "
        r"at \['dec'\]",
    ):
        jc.list_variables(path)


def test_zarr_python_opens_a_split_checkpoint(saved):
    path, tree = saved
    group = zarr.open_group(path, mode="r")
    np.testing.assert_array_equal(group["enc/b0/big"][...], tree["enc"]["b0"]["big"])
    np.testing.assert_array_equal(group["enc"]["b0"]["big"][7:9], [7, 8])
    assert group["enc/b3"].attrs["jaxckpt"]["tree"]["t"] == "dict"
    rec = jc.open(path).record("enc/b3/s1/w4")
    start, nbytes, _ = rec["packed"]
    raw = group[rec["loc"]][start : start + nbytes]
    np.testing.assert_array_equal(raw.view(rec["dtype"]), _leaf(314))
