"""Edge names: every key round-trips as itself and nothing is written outside the checkpoint."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from core_helpers import assert_tree_equal, files_under

import jaxckpt as jc
from jaxckpt.format import paths as _paths

ODD_KEYS = [
    "a/b", "%", "%2F", "a%b", ".", "..", "...", "", "__x", "__", "~", "~i0", "naïve ✓ 日本",
    "zarr.json", "COMMIT", "commit", "c", "a\\b", "a:b", "tab\there", "\x00", "\ud800",
    "../../escape", "/abs", " sp ",
]  # fmt: skip


@pytest.mark.parametrize("key", ODD_KEYS, ids=ascii)
def test_escape_roundtrips_and_is_a_safe_name(key):
    name = _paths.escape(key)
    assert _paths.unescape(name) == key
    assert name and "/" not in name and "\\" not in name and "\x00" not in name
    assert set(name) != {"."} and not name.startswith(("__", "~"))
    assert name.lower() not in ("zarr.json", "commit")
    name.encode("utf-8")  # a valid file name on every filesystem that takes UTF-8


def test_escape_is_injective_over_odd_keys():
    names = [_paths.escape(k) for k in ODD_KEYS]
    assert len(set(names)) == len(names)


def test_odd_keys_roundtrip_and_stay_inside(tmp_path, monkeypatch):
    monkeypatch.setattr(jc.checkpoint.plan, "PACK_BELOW", 0)  # every leaf a directory: check names
    tree = {k: np.full(2, i, np.int16) for i, k in enumerate(ODD_KEYS)}
    tree["a"] = {"b": np.arange(3)}  # nested a -> b beside the key "a/b"
    path = jc.save(tmp_path / "ckpt", tree)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing beside the checkpoint
    out = jc.restore(path)
    assert_tree_equal(out, tree)
    assert_tree_equal(jc.restore(path, tree), tree)
    paths = dict((p, s) for p, s, _ in jc.list_variables(path))
    assert paths["a%2Fb"] == (2,) and paths["a/b"] == (3,)
    files = files_under(path)
    for f in files:  # every file is at its real place inside the checkpoint
        full = os.path.realpath(os.path.join(path, f))
        assert full.startswith(os.path.realpath(path) + os.sep)
    top = set(os.listdir(path))
    assert {"zarr.json", "COMMIT"} <= top
    assert {"%7Aarr.json", "%43OMMIT", "%63ommit", "%2E", "%2E.", "%2E..", "%", "%5F_x"} <= top
    assert "..%2F..%2Fescape" in top and "%2Fabs" in top


def test_int_key_str_key_and_index_are_distinct(tmp_path):
    # JAX cannot sort int and str keys of one dict, so they meet in sibling dicts.
    tree = {
        "ints": {0: np.int8(1), -1: np.int8(5)},
        "strs": {"0": np.int8(2), "~i0": np.int8(4)},
        "seq": [np.int8(3)],
    }
    path = jc.save(tmp_path / "c", tree)
    assert jc.list_variables(path) == [
        ("ints/~i-1", (), "int8"),
        ("ints/~i0", (), "int8"),
        ("seq/0", (), "int8"),
        ("strs/%7Ei0", (), "int8"),
        ("strs/0", (), "int8"),
    ]
    out = jc.restore(path)
    assert_tree_equal(out, tree)
    assert out["ints"][0] == 1 and out["strs"]["0"] == 2 and out["seq"][0] == 3


def test_metadata_records_edge_kinds(tmp_path):
    tree = {0: {"a": [np.ones(1)]}}
    reader = jc.open(jc.save(tmp_path / "c", tree))
    ((kind, key, child),) = reader.structure["c"]
    assert (kind, key) == ("i", 0)
    assert child["c"][0][:2] == ["d", "a"] and child["c"][0][2]["c"][0][:2] == ["s", 0]


def test_colliding_custom_names_are_refused(tmp_path):
    @jax.tree_util.register_pytree_with_keys_class
    class Mixed:
        def tree_flatten_with_keys(self):
            k = jax.tree_util
            return [(k.DictKey("0"), np.ones(1)), (k.SequenceKey(0), np.ones(1))], None

        def tree_flatten(self):
            return [np.ones(1), np.ones(1)], None

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls()

    with pytest.raises(
        jc.UnsupportedLeafError, match=r"Two children of <root> map to the same name '0'"
    ):
        jc.save(tmp_path / "c", Mixed())
    assert not os.listdir(tmp_path)
