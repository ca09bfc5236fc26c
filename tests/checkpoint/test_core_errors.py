"""Bad input gets a clear error (key path, expected, found, fix), and nothing is lost."""

from __future__ import annotations

import os
import re
import resource
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_helpers import assert_tree_equal, edit_metadata, files_under, rewrite_metadata

import jaxckpt as jc
from jaxckpt.checkpoint import save_steps as _steps


def _snapshot(root) -> dict[str, bytes]:
    out = {}
    for f in files_under(root):
        with open(os.path.join(root, f), "rb") as fh:
            out[f] = fh.read()
    return out


@pytest.fixture
def ckpt(tmp_path):
    tree = {
        "params": {"l1": {"kernel": jnp.ones((1, 5)), "bias": jnp.arange(5.0)}},
        "opt_state": ({"mu": {"l1": {"kernel": jnp.zeros((1, 5))}}},),
        "step": 3,
    }
    return jc.save(tmp_path / "ckpt", tree), tree


# ---------------------------------------------------------------------------- save


class Opaque:
    pass


class BadState:
    def get_state(self):
        return {"f": Opaque()}

    def set_state(self, state):
        pass


@pytest.mark.parametrize(
    "tree, pattern",
    [
        (
            {"a": [1, {"b": Opaque()}]},
            r"The leaf at \['a'\]\[1\]\['b'\] is a test_core_errors\.Opaque, which jaxckpt "
            r"cannot save: it expects a jax\.Array, np\.ndarray.*Fix: turn it into an array",
        ),
        (
            {"w": np.array([object()])},
            r"The array at \['w'\] has dtype object, which jaxckpt cannot save: it expects a "
            r"numeric or bool dtype.*Fix: convert it",
        ),
        ({"s": np.array(["ab", "c"])}, r"The array at \['s'\] has dtype <U2.*Fix: convert it"),
        (
            {"it": BadState()},
            r"The state of the BadState at \['it'\] could not be serialised.*Fix: make get_state",
        ),
        (
            {"d": {(1, 2): np.ones(1)}},
            r"The dict at \['d'\] has the key \(1, 2\), a tuple; jaxckpt expects dict keys that "
            r"are str or int\. Fix: convert the keys",
        ),
        (
            {"k": {"x" * 300: np.ones(1)}},
            r"The key 'x{40}'\.\.\. at \['k'\] becomes a file name of 300 bytes, but file "
            r"systems take at most 255\. Fix: shorten the key",
        ),
    ],
    ids=["object", "object-array", "str-array", "state", "dict-key", "long-key"],
)
def test_unserialisable_leaf(tmp_path, tree, pattern):
    with pytest.raises(jc.UnsupportedLeafError, match=re.compile(pattern, re.S)) as e:
        jc.save(tmp_path / "c", tree)
    assert isinstance(e.value, TypeError)
    assert os.listdir(tmp_path) == []  # found before anything was written


def test_traced_leaf(tmp_path):
    @jax.jit
    def f(x):
        jc.save(tmp_path / "c", {"x": x})
        return x

    with pytest.raises(
        jc.UnsupportedLeafError,
        match=r"The leaf at \['x'\] is a traced value.*Fix: call jc.save outside",
    ):
        f(jnp.ones(2))
    assert os.listdir(tmp_path) == []


def test_existing_checkpoint_is_never_clobbered(ckpt, tmp_path):
    path, _ = ckpt
    before = _snapshot(path)
    with pytest.raises(
        jc.CheckpointExistsError,
        match=r"A checkpoint already exists at .*ckpt; jaxckpt never overwrites one\. Fix: save to a new path",
    ) as e:
        jc.save(path, {"other": np.zeros(2)})
    assert isinstance(e.value, FileExistsError)
    assert _snapshot(path) == before
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(
        jc.CheckpointExistsError,
        match=r"full exists and is neither an empty directory nor a checkpoint\. Fix: choose another path",
    ):
        jc.save(tmp_path / "full", {"a": np.ones(1)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "full"]
    # An empty directory is fine to save into.
    os.makedirs(tmp_path / "empty")
    jc.save(tmp_path / "empty", {"a": np.ones(1)})


def test_losing_a_commit_race_leaves_the_winner(tmp_path):
    """Two saves to one path: the one committing second fails and removes only its own files."""
    late = _steps.prepare(tmp_path / "c", {"late": np.ones(3)}, {})
    jc.save(tmp_path / "c", {"early": np.zeros(2)})
    before = _snapshot(tmp_path / "c")
    with pytest.raises(jc.CheckpointExistsError, match="A checkpoint already exists at"):
        _steps.execute(late, budget=1 << 30)
    assert os.listdir(tmp_path) == ["c"]
    assert _snapshot(tmp_path / "c") == before
    assert_tree_equal(jc.restore(tmp_path / "c"), {"early": np.zeros(2)})


def test_write_error_midway_leaves_no_debris(ckpt, tmp_path):
    """A real write failure (file size limit) after some arrays were written."""
    path, tree = ckpt
    before = _snapshot(path)
    big = {"a": np.ones(3), "b": np.ones((1024, 1024), np.float32), "c": np.ones(2)}
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))
    try:
        with pytest.raises(Exception, match="File too large"):
            jc.save(tmp_path / "next", big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary sibling, no half checkpoint
    assert _snapshot(path) == before
    assert_tree_equal(jc.restore(path, tree), tree)
    jc.save(tmp_path / "next", big)  # the same save succeeds once the disk takes it


# ---------------------------------------------------------------------------- restore


def test_shape_the_target_cannot_take(ckpt):
    path, tree = ckpt
    target = {**tree, "params": {"l1": {"kernel": jnp.ones((2, 5)), "bias": jnp.ones(5)}}}
    with pytest.raises(jc.StructureMismatchError) as e:
        jc.restore(path, target)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "Leaves whose shape or dtype the target cannot take (1):" in msg
    assert (
        "['params']['l1']['kernel']: the target expects float32[2, 5], the checkpoint has float32[1, 5]"
        in msg
    )
    assert 'Fix: pass mismatched="keep" to keep the target\'s own value for these' in msg
    assert "or build the target with the saved shapes" in msg


@pytest.mark.parametrize(
    "leaf, expected",
    [
        (jnp.ones(5, jnp.int32), "int32[5] (no safe cast from float32)"),
        (np.ones(5, np.bool_), "bool[5] (no safe cast from float32)"),
        ("text", "a Python str"),
    ],
    ids=["int", "bool", "str"],
)
def test_dtype_the_target_cannot_take(ckpt, leaf, expected):
    path, tree = ckpt
    target = {**tree, "params": {"l1": {"kernel": jnp.ones((1, 5)), "bias": leaf}}}
    with pytest.raises(
        jc.StructureMismatchError,
        match=re.escape(
            f"['params']['l1']['bias']: the target expects {expected}, the checkpoint has float32[5]"
        ),
    ):
        jc.restore(path, target)
    assert jc.match(path, target).mismatched[0].path == "params/l1/bias"


def test_target_leaf_missing_from_checkpoint(ckpt):
    path, tree = ckpt
    target = {**tree, "params": {**tree["params"], "l2": {"kernel": jnp.ones((5, 2))}}}
    with pytest.raises(jc.StructureMismatchError) as e:
        jc.restore(path, target)
    msg = str(e.value)
    assert (
        "Target leaves the checkpoint lacks (1):\n    ['params']['l2']['kernel']  (looked for 'params/l2/kernel')"
        in msg
    )
    assert 'Fix: pass missing="keep"' in msg and "jc.list_variables(path)" in msg
    assert "Saved leaves the target lacks" not in msg


def test_saved_leaves_the_target_lacks(ckpt):
    path, tree = ckpt
    target = {"params": tree["params"], "step": 0}
    with pytest.raises(jc.StructureMismatchError) as e:
        jc.restore(path, target)
    msg = str(e.value)
    assert (
        "Saved leaves the target lacks (1):\n    ['opt_state'][0]['mu']['l1']['kernel']  (saved as 'opt_state/0/mu/l1/kernel')"
        in msg
    )
    assert "Fix: pass partial=True to restore only the leaves the target asks for" in msg
    out = jc.restore(path, target, partial=True)
    assert_tree_equal(out, {"params": tree["params"], "step": 3})


def test_kept_leaves_are_not_reported_as_errors(ckpt):
    path, tree = ckpt
    target = {"params": {**tree["params"], "head": jnp.ones(2)}, "step": 0}
    with pytest.raises(jc.StructureMismatchError) as e:
        jc.restore(path, target, missing="keep")
    assert "Saved leaves the target lacks (1)" in str(e.value)
    assert "head" not in str(e.value) and "missing=" not in str(e.value)


def test_long_mismatch_lists_are_cut(tmp_path):
    path = jc.save(tmp_path / "c", {f"k{i:02d}": np.ones(1) for i in range(25)})
    with pytest.raises(
        jc.StructureMismatchError, match=r"\['k20'\]  \(saved as 'k20'\)\n    \.\.\. and 4 more\n"
    ):
        jc.restore(path, {"k00": np.ones(1)})


def test_bad_prefix_and_missing_argument(ckpt):
    path, tree = ckpt
    with pytest.raises(
        jc.StructureMismatchError,
        match=r"prefix='params/l9' is not a path in the checkpoint .*Fix: pick a prefix",
    ):
        jc.restore(path, {"kernel": jnp.ones((1, 5))}, prefix="params/l9")
    with pytest.raises(jc.StructureMismatchError, match=r"prefix='params/l9' is not a path"):
        jc.restore(path, prefix="params/l9")
    with pytest.raises(ValueError, match=r'missing must be "error" or "keep", not \'drop\''):
        jc.restore(path, tree, missing="drop")


@pytest.mark.parametrize("api", [jc.restore, jc.list_variables, jc.open, lambda p: jc.match(p, {})])
def test_no_checkpoint(tmp_path, api):
    with pytest.raises(
        jc.CheckpointNotFoundError, match=r"No checkpoint at .*nowhere\. Fix: check the path"
    ) as e:
        api(tmp_path / "nowhere")
    assert isinstance(e.value, FileNotFoundError)


def test_uncommitted_checkpoint(ckpt):
    path, _ = ckpt
    os.remove(os.path.join(path, "COMMIT"))
    with pytest.raises(
        FileNotFoundError,
        match=r"holds no committed checkpoint \(no COMMIT marker\): it is an unfinished or interrupted save\. Fix: restore an earlier checkpoint",
    ):
        jc.restore(path)


def test_corrupted_chunk(tmp_path):
    kernel = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    path = jc.save(tmp_path / "c", {"params": {"encoder": {"kernel": kernel}}, "ok": np.ones(3)})
    (chunk,) = [
        os.path.join(d, f) for d, _, fs in os.walk(f"{path}/params/encoder/kernel/c") for f in fs
    ]
    with open(chunk, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    pattern = r"Reading the array 'params/encoder/kernel' of .* failed: .*checksum.*Fix: restore an earlier checkpoint"
    with pytest.raises(jc.CorruptCheckpointError, match=re.compile(pattern, re.S)):
        jc.restore(path)
    with pytest.raises(jc.CorruptCheckpointError, match="'params/encoder/kernel'"):
        jc.open(path)["params/encoder/kernel"]
    np.testing.assert_array_equal(jc.open(path)["ok"], np.ones(3))  # the rest still reads


def _edit_root_meta(path, fn):
    edit_metadata(path, "zarr.json", fn)  # checksum and all: as a save would write it


def test_newer_format_version(ckpt):
    path, _ = ckpt
    _edit_root_meta(path, lambda r: r["attributes"]["jaxckpt"].update(format_version=99))
    with pytest.raises(
        jc.FormatVersionError,
        match=r"was written in jaxckpt format version 99, but this jaxckpt reads versions up to 3\. Fix: upgrade jaxckpt",
    ):
        jc.restore(path)


def test_damaged_metadata(ckpt):
    path, _ = ckpt
    _edit_root_meta(path, lambda r: r["attributes"].pop("jaxckpt"))
    with pytest.raises(
        jc.CorruptCheckpointError,
        match=r"zarr\.json has no jaxckpt metadata.*Fix: point at a directory written by jaxckpt",
    ):
        jc.open(path)
    with open(os.path.join(path, "zarr.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(
        jc.CorruptCheckpointError,
        match=r"zarr\.json is damaged: it fails the crc32c checksum that COMMIT records for it\. "
        r"Fix: restore an earlier checkpoint",
    ):
        jc.list_variables(path)
    rewrite_metadata(path, "zarr.json", b"{not json")  # its checksum recorded: crafted
    with pytest.raises(
        jc.CorruptCheckpointError,
        match=r"zarr\.json is not valid JSON .*Fix: restore an earlier checkpoint",
    ):
        jc.list_variables(path)


def test_error_classes_subclass_builtins():
    assert issubclass(jc.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(jc.StructureMismatchError, ValueError)
    assert issubclass(jc.CheckpointExistsError, FileExistsError)
    assert issubclass(jc.UnsupportedLeafError, TypeError)
    for cls in (jc.CorruptCheckpointError, jc.FormatVersionError, jc.StructureMismatchError):
        assert issubclass(cls, jc.CheckpointError)
