"""``jaxckpt convert``: Flax msgpack and Orbax checkpoints in, Flax msgpack out."""

import os

import jax
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import serialization

import jaxckpt as jc
from jaxckpt.tools.cli import main


def train_state():
    params = {
        "l1": {
            "kernel": np.arange(5, dtype=np.float32).reshape(1, 5),
            "bias": np.array([0.5, -1, 2, np.inf, np.nan], np.float32),
        },
        "emb": np.arange(6).astype(ml_dtypes.bfloat16).reshape(2, 3),
    }
    opt_state = optax.adam(0.1).init(params)
    opt_state = (
        opt_state[0]._replace(mu=jax.tree_util.tree_map(lambda x: x + 1, opt_state[0].mu)),
        opt_state[1],
    )
    return {"params": params, "opt_state": opt_state, "step": 50, "flags": np.array([True, False])}


def assert_trees_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(g, w)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_flax_msgpack_to_jaxckpt_and_back(tmp_path, capsys):
    state = train_state()
    src = tmp_path / "state.msgpack"
    src.write_bytes(serialization.to_bytes(state))
    dst = tmp_path / "ckpt"
    code, out, _ = run(capsys, "convert", str(src), str(dst))
    assert code == 0
    assert (
        out
        == f"Converted the Flax msgpack file {src} (12 leaves) to the jaxckpt checkpoint {dst}\n"
    )
    assert ("opt_state/0/mu/l1/kernel", (1, 5), "float32") in jc.list_variables(dst)
    assert ("params/emb", (2, 3), "bfloat16") in jc.list_variables(dst)
    # The converted checkpoint restores into the training state the Flax file was made from.
    assert_trees_equal(jc.restore(dst, target=state), state)
    # ... and exports back to a file flax.serialization.from_bytes reads.
    back = tmp_path / "back.msgpack"
    code, out, _ = run(capsys, "convert", str(dst), str(back))
    assert code == 0
    assert (
        out
        == f"Converted the jaxckpt checkpoint {dst} (12 leaves) to the Flax msgpack file {back}\n"
    )
    assert_trees_equal(serialization.from_bytes(state, back.read_bytes()), state)


def test_jaxckpt_to_flax_msgpack(tmp_path, capsys):
    state = train_state()
    ckpt = jc.save(tmp_path / "ckpt-50", state)
    dst = tmp_path / "out.msgpack"
    assert main(["convert", ckpt, str(dst)]) == 0
    assert_trees_equal(serialization.from_bytes(state, dst.read_bytes()), state)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-50", "out.msgpack"]  # no temporary file left


def test_orbax_checkpoints_convert(tmp_path, capsys):
    state = train_state()
    del state["params"]["emb"], state["opt_state"][0].mu["emb"], state["opt_state"][0].nu["emb"]
    item = str(tmp_path / "orbax_item")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(item, state)
    code, out, _ = run(capsys, "convert", item, str(tmp_path / "a"))
    assert code == 0 and out.startswith(f"Converted the Orbax checkpoint {item} (9 leaves)")
    assert_trees_equal(jc.restore(tmp_path / "a", target=state), state)

    # A manager's step directory, with a PyTree item and a JSON item.
    run_dir = str(tmp_path / "orbax_run")
    with ocp.CheckpointManager(run_dir, item_names=("state", "extra")) as mngr:
        mngr.save(
            7,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave({"lr": 0.1})
            ),
        )
    code, _, _ = run(capsys, "convert", os.path.join(run_dir, "7"), str(tmp_path / "b"))
    assert code == 0
    reader = jc.open(tmp_path / "b")
    assert reader.step == 7 and reader["extra/lr"] == 0.1
    assert_trees_equal(jc.restore(tmp_path / "b", target=state, prefix="state"), state)

    code, _, err = run(capsys, "convert", run_dir, str(tmp_path / "c"))
    assert code == 2
    assert err == (
        f"jaxckpt convert: error: {run_dir} holds the steps [7] of an Orbax CheckpointManager; "
        f"convert one step at a time. Fix: jaxckpt convert {run_dir}/7 DST\n"
    )


KINDS = (
    "jaxckpt convert reads a safetensors file (or the index of a sharded set), a Flax msgpack "
    "file (flax.serialization.to_bytes), an Orbax checkpoint directory (one step, or one item of "
    "it), or a jaxckpt checkpoint."
)


def test_convert_errors_name_the_fix(tmp_path, capsys):
    ckpt = jc.save(tmp_path / "ckpt", {"w": np.ones(2)})
    flax_file = tmp_path / "s.msgpack"
    flax_file.write_bytes(serialization.to_bytes({"w": np.ones(2)}))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xc1 not msgpack")
    os.makedirs(tmp_path / "other")
    (tmp_path / "taken.msgpack").write_bytes(b"")
    cases = [
        (
            tmp_path / "missing",
            "x",
            f"No file or directory {tmp_path / 'missing'}. Fix: check the path. {KINDS}",
        ),
        (junk, tmp_path / "d1", f"{junk} is not a Flax msgpack file"),
        (
            tmp_path / "other",
            tmp_path / "d2",
            f"{tmp_path / 'other'} is not a checkpoint that jaxckpt can read. {KINDS}",
        ),
        (
            ckpt,
            tmp_path / "d3",
            f"{ckpt} is already a jaxckpt checkpoint. Fix: give a DST ending in .msgpack or "
            ".safetensors to export it.",
        ),
        (
            flax_file,
            tmp_path / "d4.msgpack",
            f"{flax_file} is already a Flax msgpack file. Fix: give a DST directory",
        ),
        (
            ckpt,
            tmp_path / "taken.msgpack",
            f"{tmp_path / 'taken.msgpack'} already exists; convert never overwrites.",
        ),
        (flax_file, ckpt, f"A checkpoint already exists at {ckpt}; jaxckpt never overwrites one."),
    ]
    for src, dst, message in cases:
        code, out, err = run(capsys, "convert", str(src), str(dst))
        assert code == 2 and out == "", (src, dst)
        assert err.startswith("jaxckpt convert: error: ") and message in err, err
    assert not os.path.exists(tmp_path / "d1") and not os.path.exists(tmp_path / "d4.msgpack")


def test_convert_shows_its_progress_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    import io
    import sys

    from jaxckpt import progress as _progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    flax_file = tmp_path / "s.msgpack"
    flax_file.write_bytes(serialization.to_bytes({"w": np.ones(256, np.float32)}))
    assert main(["convert", str(flax_file), str(tmp_path / "piped")]) == 0
    assert capsys.readouterr().err == ""  # not a terminal: nothing
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["convert", "-q", str(flax_file), str(tmp_path / "quiet")]) == 0
    assert terminal.getvalue() == ""
    assert main(["convert", str(flax_file), str(tmp_path / "shown")]) == 0
    full = "[##############################] 100.0%  1.0 KiB of 1.0 KiB"
    assert terminal.getvalue().endswith(f"save {tmp_path / 'shown'}: {full}\n")
    assert _progress._settings["on"] is False  # as it was before the command
