"""A stranger's checkpoint is safe to open: nothing its metadata says is used unchecked.

Every path stays inside the checkpoint (no "..", no absolute path, no link leading out), and
every record is checked before anything is allocated or planned from it. Each violation is a
CorruptCheckpointError naming the checkpoint and the leaf (docs/format.md, "What a reader
enforces").
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from core_helpers import edit_metadata

import jaxckpt as jc
from jaxckpt import memory as _memory
from jaxckpt.checkpoint import plan as _plan
from jaxckpt.format import split as _split
from jaxckpt.tools.cli import main


def _save(path, tree):
    return str(jc.save(path, tree))


def _edit_root(ck, edit):
    """Applies ``edit(tree_record)`` to the root zarr.json of the checkpoint ``ck``, with the
    checksum COMMIT holds for it: a crafted checkpoint, not a damaged one."""
    edit_metadata(ck, "zarr.json", lambda doc: edit(doc["attributes"]["jaxckpt"]["tree"]))


def _set(ck, leaf, **fields):
    """Sets ``fields`` of the record of the top-level leaf ``leaf`` (None deletes a field)."""

    def edit(tree):
        rec = next(c for _, k, c in tree["c"] if k == leaf)
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
    monkeypatch.setattr(_plan, "PACK_MIN_LEAVES", 1)
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


# ---------------------------------------------------------------------------- records


def _refused_everywhere(ck, what, leaf="a", index=(slice(0, 2),)):
    """As _refused, and jc.list_variables too (it hands out every record)."""
    _refused(ck, leaf, what, index=index)
    with pytest.raises(jc.CorruptCheckpointError, match=re.escape(f"['{leaf}']") + ".*" + what):
        jc.list_variables(ck)


def test_a_shape_its_zarr_json_does_not_hold_allocates_nothing(pair):
    """shape [2**40] (4 TiB) while a/zarr.json says [4, 4]: refused before any allocation."""
    ck, _ = pair
    _set(ck, "a", shape=[2**40], chunks=[2**40])
    pattern = r"is recorded with (shape|the shape) \[1099511627776\].*zarr.json says.*\[4, ?4\]"
    _refused(ck, what=pattern)


@pytest.mark.parametrize(
    "fields, what",
    [
        ({"chunks": [0, 4]}, "has the chunks"),
        ({"chunks": [4]}, "has the chunks"),
        ({"chunks": [8, 4]}, "has the chunks"),  # a chunk larger than its dimension
        ({"shape": [-4, 4]}, "has the shape"),
        ({"shape": [4, 4.0]}, "has the shape"),
        ({"shape": "44"}, "has the shape"),
        ({"shape": [1] * 33, "chunks": [1] * 33}, "has the shape"),
        ({"shape": [2**40, 2**40], "chunks": [2**40, 2**40]}, "claims"),
        ({"dtype": "O"}, "has the dtype 'O'"),
        ({"dtype": "<U4"}, "has the dtype"),
        ({"dtype": "float"}, "has the dtype"),  # not how jaxckpt spells a dtype
        ({"dtype": None}, "has the dtype"),
        ({"stored": "uint8"}, "is stored as 'uint8'"),
        ({"stored": "V4"}, "is stored as"),
        ({"zero_chunks": [1]}, "lists the zero chunks"),  # one chunk: index 0 only
        ({"zero_chunks": [0, 0]}, "lists the zero chunks"),
        ({"zero_chunks": "some"}, "lists the zero chunks"),
        ({"np_scalar": True}, "has np_scalar"),
        ({"key": "nokey", "key_dtype": "key<fry>", "key_shape": [4]}, "PRNG key record"),
    ],
)
def test_a_crafted_array_record_is_refused(pair, fields, what):
    ck, _ = pair
    _set(ck, "a", **fields)
    _refused_everywhere(ck, re.escape(what))


def test_two_million_chunks_for_two_mib_are_refused_before_planning(tmp_path):
    ck = _save(tmp_path / "ck", {"a": np.ones(2 << 20, np.uint8)})
    _set(ck, "a", chunks=[1])
    _refused_everywhere(ck, "into 2097152 chunks.*at most 65536", index=(slice(0, 2),))


def test_a_typed_key_record_that_jax_cannot_wrap_is_refused(tmp_path):
    import jax

    ck = _save(tmp_path / "ck", {"a": jax.random.key(0)})
    _set(ck, "a", key="threefry9x9")
    _refused_everywhere(ck, "PRNG key record", index=None)


@pytest.mark.parametrize(
    "rec, what",
    [
        ({"t": "value", "py": "float", "v": "abc"}, "cannot be decoded"),
        ({"t": "value", "py": "int", "v": "1"}, "cannot be decoded"),
        ({"t": "value", "py": "bytes", "v": "***"}, "cannot be decoded"),
        ({"t": "value", "py": "set", "v": []}, "cannot be decoded"),
        ({"t": "state", "cls": "x.Y"}, "state record"),
    ],
)
def test_a_crafted_value_record_is_refused(tmp_path, rec, what):
    ck = _save(tmp_path / "ck", {"a": 1.5, "b": np.zeros(3)})
    _edit_root(ck, lambda t: t["c"][0].__setitem__(2, rec))
    pattern = f"{re.escape(ck)} is damaged or was crafted: the leaf \\['a'\\].*{what}"
    for read in (lambda: jc.restore(ck), lambda: jc.open(ck)["a"], lambda: jc.list_variables(ck)):
        with pytest.raises(jc.CorruptCheckpointError, match=pattern):
            read()
    assert main(["verify", "-q", ck]) == 1


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda m: m.update(fill_value=1), "fill.value"),
        (lambda m: m.update(data_type="int32"), "data.type"),
        (lambda m: m["codecs"].pop(), "codecs"),
        (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[2, 2]), "chunk"),
    ],
)
def test_an_array_zarr_json_that_disagrees_with_the_record_is_refused(pair, edit, what):
    """What zarr-python would read differently from what jaxckpt reads (a flipped fill value
    makes it read ones where zeros were saved) is damage to jaxckpt too."""
    ck, _ = pair

    def in_place(meta):  # some edits return what they removed: the file keeps ``meta``
        edit(meta)

    edit_metadata(ck, "a/zarr.json", in_place)
    _refused(ck, what=what)


@pytest.mark.parametrize(
    "fields, what",
    [
        ({"packed": [0, 2**40, 1 << 20], "shape": [2**38]}, "at bytes 0 to 1099511627776"),
        ({"packed": [0, 2**40, 1 << 20]}, "has the packed place"),
        ({"packed": [0, 64, 0]}, "has the packed place"),
        ({"packed": [-64, 64, 1 << 20]}, "has the packed place"),
        ({"packed": [0, 64]}, "has the packed place"),
        ({"packed": [2**30, 64, 1 << 20]}, "is recorded at bytes 1073741824"),  # past its pack
        ({"packed": [0, 64, 1 << 10]}, "in chunks of 1024, but the pack holds"),
        ({"crc32c": -1}, "has the crc32c"),
    ],
)
def test_a_crafted_packed_record_is_refused(packed, fields, what):
    ck, _ = packed
    _set(ck, "a", **fields)
    if what.startswith("has"):  # the record alone is wrong
        _refused_everywhere(ck, re.escape(what), index=None)
    else:  # the record disagrees with its pack's zarr.json, read with the data
        _refused(ck, what=re.escape(what), index=None)


def test_a_crafted_pack_zarr_json_is_refused(packed):
    ck, _ = packed

    def edit(meta):
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [1]
        meta["shape"] = [2**40]

    edit_metadata(ck, "~pack/0/zarr.json", edit)
    _refused(ck, what="is packed in an array whose metadata", index=None)


def test_a_size_its_files_cannot_hold_allocates_nothing(tmp_path, monkeypatch):
    """Record and zarr.json both claim 64 GiB (crafted alike): the chunk files are looked at
    before the array is allocated, and they hold 68 bytes."""
    from jaxckpt.storage import chunk_files as _chunks

    ck = _save(tmp_path / "ck", {"a": np.ones(16, np.float32)})
    _set(ck, "a", shape=[2**34], chunks=[2**24])

    def edit(meta):
        meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"] = [2**34], [2**24]

    edit_metadata(ck, "a/zarr.json", edit)
    sizes = []
    real = _memory.aligned_empty
    monkeypatch.setattr(
        _chunks, "aligned_empty", lambda s, *a, **k: sizes.append(s) or real(s, *a, **k)
    )
    with pytest.raises(jc.CorruptCheckpointError, match=r"a/c/0 has 68 bytes, expected 67108868"):
        jc.restore(ck)
    with pytest.raises(jc.CorruptCheckpointError, match=r"a/c/0 has 68 bytes"):
        jc.open(ck)["a"]
    assert sizes == []
