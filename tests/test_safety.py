"""A stranger's checkpoint is safe to open: nothing its metadata says is used unchecked.

Every path stays inside the checkpoint (no "..", no absolute path, no link leading out), and
every record is checked before anything is allocated or planned from it. Each violation is a
CorruptCheckpointError naming the checkpoint and the leaf (docs/format.md, "What a reader
enforces").
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import jaxckpt as jc
from jaxckpt import _split, _write
from jaxckpt.cli import main


def _save(path, tree):
    return str(jc.save(path, tree))


def _edit_root(ck, edit):
    """Applies ``edit(tree_record)`` to the root zarr.json of the checkpoint ``ck``."""
    p = os.path.join(ck, "zarr.json")
    with open(p) as f:
        doc = json.load(f)
    edit(doc["attributes"]["jaxckpt"]["tree"])
    with open(p, "w") as f:
        json.dump(doc, f)


def _set(ck, key, **fields):
    """Sets ``fields`` of the record of the top-level leaf ``key`` (None deletes a field)."""

    def edit(tree):
        rec = next(c for _, k, c in tree["c"] if k == key)
        for name, value in fields.items():
            if value is None:
                rec.pop(name, None)
            else:
                rec[name] = value

    _edit_root(ck, edit)


def _refused(ck, leaf="a", what="", *, verify=True, index=(slice(0, 2),)):
    """Every way of reading the leaf raises CorruptCheckpointError naming ck and the leaf."""
    name = re.escape(f"['{leaf}']")
    pattern = f"{re.escape(ck)} is damaged or was crafted: the leaf {name}.*{what}"
    with pytest.raises(jc.CorruptCheckpointError, match=pattern):
        jc.restore(ck)
    with pytest.raises(jc.CorruptCheckpointError, match=pattern):
        jc.open(ck)[leaf]
    if index is not None:  # a slice: read through TensorStore
        with pytest.raises(jc.CorruptCheckpointError, match=pattern):
            jc.open(ck).read(leaf, index)
    if verify:
        assert main(["verify", "-q", ck]) == 1


@pytest.fixture
def pair(tmp_path):
    """``ck`` holding {"a": ones(4, 4)} and ``evil`` holding other data, side by side."""
    ck = _save(tmp_path / "ck", {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.int32)})
    evil = _save(tmp_path / "evil", {"a": np.full((4, 4), 7, np.float32)})
    return ck, evil


# ---------------------------------------------------------------------------- paths


@pytest.mark.parametrize("loc", ["../evil/a", "ABS", "a/../../evil/a", "./a", "a//c", ""])
def test_a_loc_leading_outside_is_refused(pair, loc):
    ck, evil = pair
    _set(ck, "a", loc=os.path.join(evil, "a") if loc == "ABS" else loc)
    _refused(ck, what="does not stay inside the checkpoint")


@pytest.mark.parametrize("loc", ["a\\..\\..\\evil", "a\x00b", None, 3, ["a"]])
def test_a_loc_that_is_no_plain_path_is_refused(pair, loc):
    ck, _ = pair
    _set(ck, "a", loc=loc)
    if loc is None:  # a null loc
        _edit_root(ck, lambda t: t["c"][0][2].__setitem__("loc", None))
    _refused(ck, what="loc")


def test_a_loc_is_checked_before_any_file_is_touched(pair, monkeypatch):
    """A loc of "../../etc" is refused from its syntax: nothing outside is probed."""
    ck, _ = pair
    _set(ck, "a", loc="../../etc")
    reader = jc.open(ck)
    touched = []
    for name in ("open", "lstat", "stat", "scandir", "listdir"):
        real = getattr(os, name)

        def spy(p, *a, real=real, **k):
            touched.append(os.fspath(p) if not isinstance(p, int) else p)
            return real(p, *a, **k)

        monkeypatch.setattr(os, name, spy)
    with pytest.raises(jc.CorruptCheckpointError, match="does not stay inside"):
        reader.read("a")
    with pytest.raises(jc.CorruptCheckpointError, match="does not stay inside"):
        reader.read("a", (slice(0, 1),))
    assert not [p for p in touched if isinstance(p, str) and "etc" in p]


def _link(target, at):
    """Replaces ``at`` with a symbolic link to ``target``."""
    if os.path.isdir(at) and not os.path.islink(at):
        import shutil

        shutil.rmtree(at)
    elif os.path.lexists(at):
        os.remove(at)
    os.symlink(target, at)


@pytest.mark.parametrize("where", ["a", "a/c", "a/c/0"])
def test_a_directory_linked_outside_is_refused(pair, where):
    ck, evil = pair
    _link(os.path.join(evil, where), os.path.join(ck, where))
    _refused(ck, what="symbolic link that leads outside the checkpoint")


def test_a_chunk_file_linked_anywhere_is_refused(pair):
    ck, evil = pair
    _link(os.path.join(evil, "a/c/0/0"), os.path.join(ck, "a/c/0/0"))
    _refused(ck, what="symbolic link")


def test_a_directory_linked_inside_the_checkpoint_still_reads(pair):
    ck, _ = pair
    os.rename(os.path.join(ck, "a"), os.path.join(ck, "a_moved"))
    os.symlink("a_moved", os.path.join(ck, "a"))
    np.testing.assert_array_equal(jc.restore(ck)["a"], np.ones((4, 4)))
    np.testing.assert_array_equal(jc.open(ck).read("a", (slice(0, 2),)), np.ones((2, 4)))


@pytest.fixture
def packed(tmp_path, monkeypatch):
    monkeypatch.setattr(_write, "PACK_MIN_LEAVES", 1)
    tree = {"a": np.ones((4, 4), np.float32), "b": np.arange(3, dtype=np.int32)}
    ck = _save(tmp_path / "ck", tree)
    evil = _save(tmp_path / "evil", {"a": np.full((4, 4), 7, np.float32)})
    with open(os.path.join(ck, "zarr.json")) as f:
        assert "packed" in f.read()
    return ck, evil


def test_a_packed_leaf_leading_outside_is_refused(packed):
    ck, evil = packed
    _set(ck, "a", loc=f"../{os.path.basename(evil)}/~pack/0")
    _refused(ck, what="does not stay inside the checkpoint", index=None)


@pytest.mark.parametrize("crc", [True, False])
def test_a_pack_linked_outside_is_refused(packed, crc):
    ck, evil = packed
    if not crc:  # the leaf is then read with its pack's whole chunks
        _set(ck, "a", crc32c=None)
    _link(os.path.join(evil, "~pack/0/c"), os.path.join(ck, "~pack/0/c"))
    _refused(ck, what="symbolic link that leads outside the checkpoint", index=None)


def test_a_split_group_file_leading_outside_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(_split, "SPLIT_BYTES", 200)
    monkeypatch.setattr(_split, "SPLIT_CHILD_BYTES", 10)
    tree = {"g": {f"w{i}": np.full(3, i, np.float32) for i in range(8)}}
    ck = _save(tmp_path / "ck", tree)
    evil = _save(tmp_path / "evil", tree)
    with open(os.path.join(ck, "zarr.json")) as f:
        assert '"split":true' in f.read()
    _link(os.path.join(evil, "g"), os.path.join(ck, "g"))
    with pytest.raises(
        jc.CorruptCheckpointError,
        match=r"g/zarr.json is reached through a symbolic link that leads outside",
    ):
        jc.restore(ck)
    with pytest.raises(jc.CorruptCheckpointError, match=r"subtree at \['g'\]"):
        jc.open(ck)["g/w0"]
    assert main(["verify", "-q", ck]) == 1
    os.remove(os.path.join(ck, "g"))
    _edit_root(ck, lambda t: t["c"][0].__setitem__(0, "s"))
    _edit_root(ck, lambda t: t["c"][0].__setitem__(1, ".."))  # a crafted sequence index
    with pytest.raises(jc.CorruptCheckpointError, match="would lie outside the checkpoint"):
        jc.restore(ck)
