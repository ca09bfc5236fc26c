"""What the manager and jc.save take: steps, metrics, restore's arguments, the peers' conventions.

Steps are non-negative ints; metrics a dict of real scalars (NaN and infinities kept); restore's
``prefix`` and ``rename`` are checked; reading outside a leaf is an IndexError; a checkpoint is
not a manager's directory nor the other way round; ``should_save`` is False for a step saved
already (or older), and under ``best_metric`` a save without the metric is kept by recency.
"""

from __future__ import annotations

import math
import os
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from core_helpers import edit_metadata
from test_manager import assert_tree_equal, index_of, on_disk, tree_of

import jaxckpt as jc
from jaxckpt.tools.cli import main

STEP_TYPE = (
    "step must be a non-negative int, not {!r} ({}). Fix: pass the step as an integer count "
    "(checkpoints are named and ordered by it)."
)


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


# ---------------------------------------------------------------------------- steps


@pytest.mark.parametrize("async_save", [False, True])
def test_a_negative_step_is_refused(tmp_path, async_save):
    d = os.fspath(tmp_path)
    m = jc.CheckpointManager(d, async_save=async_save)
    with pytest.raises(ValueError, match=r"^step must be a non-negative int, not -1\. Fix: count "):
        m.save(-1, tree_of(1))
    m.close()
    assert m.steps == [] and os.listdir(d) == ["checkpoint"]  # nothing written, nothing lost
    with pytest.raises(ValueError, match="not -1"):
        m.should_save(-1)
    with pytest.raises(ValueError, match="not -1"):
        jc.save(tmp_path / "c", tree_of(1), step=-1)


@pytest.mark.parametrize(
    "step, kind", [(1.7, "float"), (2.0, "float"), (True, "bool"), ("3", "str")]
)
def test_a_step_that_is_not_an_int_is_refused(tmp_path, step, kind):
    m = jc.CheckpointManager(tmp_path / "run", async_save=False)
    msg = re.escape(STEP_TYPE.format(step, kind))
    with pytest.raises(TypeError, match=f"^{msg}$"):
        m.save(step, tree_of(1))
    with pytest.raises(TypeError, match=f"^{msg}$"):
        jc.save(tmp_path / "c", tree_of(1), step=step)  # 1.7 was stored as step 1
    with pytest.raises(TypeError, match=f"^{msg}$"):
        m.restore(step)
    assert not os.path.exists(tmp_path / "c") and m.steps == []


def test_numpy_and_jax_integer_steps(tmp_path):
    m = jc.CheckpointManager(tmp_path / "run", async_save=False, max_to_keep=None)
    assert m.save(np.int64(3), tree_of(3)) and m.save(jnp.int32(5), tree_of(5))
    assert m.steps == [3, 5] and jc.CheckpointManager(tmp_path / "run").steps == [3, 5]
    assert_tree_equal(m.restore(np.uint8(3)), tree_of(3))
    path = jc.save(tmp_path / "c", tree_of(1), step=np.int16(7))
    assert type(jc.open(path).step) is int and jc.open(path).step == 7


# ---------------------------------------------------------------------------- metrics


def test_metrics_are_stored_as_numbers(tmp_path):
    d = os.fspath(tmp_path / "run")
    metrics = {
        "loss": np.float32(0.5),
        "bf16": ml_dtypes.bfloat16(1.5),
        "acc": jnp.float32(0.25),
        "n": np.int64(7),
        "done": True,
        "diverged": float("nan"),
        "big": float("inf"),
    }
    with jc.CheckpointManager(d) as m:
        m.save(1, tree_of(1), metrics=metrics)
    want = {"loss": 0.5, "bf16": 1.5, "acc": 0.25, "n": 7, "done": True, "big": math.inf}
    for got in (
        m.metrics(1),
        index_of(d)["checkpoints"][0]["metrics"],
        jc.open(f"{d}/ckpt-1").metrics,
    ):
        assert math.isnan(got.pop("diverged"))
        assert got == want and type(got["n"]) is int and type(got["done"]) is bool
    assert jc.CheckpointManager(d).metrics(1)["big"] == math.inf


@pytest.mark.parametrize(
    "metrics, error, message",
    [
        (
            5,
            TypeError,
            "metrics must be a dict of names to numbers, not 5 (int). Fix: name each value, e.g. "
            "metrics={'loss': loss}.",
        ),
        (
            {"loss": [1.0, 1.0]},
            ValueError,
            "The metric 'loss' is an array of shape (2,); a metric is one number. Fix: reduce it "
            "to one, e.g. float(x.mean()), or save the array in the tree.",
        ),
        (
            {"loss": np.ones(3)},
            ValueError,
            "The metric 'loss' is an array of shape (3,); a metric is one number.",
        ),
        (
            {"phase": "warmup"},
            TypeError,
            "The metric 'phase' is 'warmup' (str); a metric is one real number (int, float, "
            "bool, or a NumPy or JAX scalar). Fix: pass a number, or save other values in the "
            "tree.",
        ),
        ({"z": 1j}, TypeError, "The metric 'z' is 1j (complex); a metric is one real number"),
        ({"x": None}, TypeError, "The metric 'x' is None (NoneType); a metric is one real"),
        (
            {1: 0.5},
            TypeError,
            "metric names must be str, not 1 (int). Fix: use names such as 'loss'.",
        ),
    ],
)
def test_bad_metrics_are_refused(tmp_path, metrics, error, message):
    for async_save in (False, True):
        d = tmp_path / f"run{async_save}"
        m = jc.CheckpointManager(d, async_save=async_save)
        with pytest.raises(error, match="^" + re.escape(message)):
            m.save(1, tree_of(1), metrics=metrics)
        m.close()
        assert m.steps == [] and os.listdir(d) == ["checkpoint"]
    with pytest.raises(error, match="^" + re.escape(message)):
        jc.save(tmp_path / "c", tree_of(1), metrics=metrics)
    assert not os.path.exists(tmp_path / "c")


def test_metrics_that_are_not_a_dict_are_refused_even_when_not_saving(tmp_path):
    m = jc.CheckpointManager(tmp_path, save_interval_steps=10)
    with pytest.raises(TypeError, match="metrics must be a dict of names to numbers, not 5"):
        m.save(3, tree_of(3), metrics=5)


# ---------------------------------------------------------------------------- restore's options


@pytest.mark.parametrize("with_target", [False, True])
def test_restore_prefix_and_rename_of_the_wrong_type(tmp_path, with_target):
    path = jc.save(tmp_path / "c", {"a": {"w": np.ones(3)}})
    target = {"w": np.zeros(3)} if with_target else None
    with pytest.raises(
        TypeError,
        match=re.escape(
            "prefix must be a path in the checkpoint, as a str such as 'params/backbone' or a "
            "tuple of keys such as ('params', 'backbone'), or None, not 123 (int). Fix: pass the "
            "path as a str or a tuple of keys."
        ),
    ):
        jc.restore(path, target, prefix=123)
    if with_target:
        with pytest.raises(
            TypeError,
            match=re.escape(
                "rename must be a dict of regex -> replacement, a callable mapping a target path "
                "to a checkpoint path (or None), or None; not 123 (int). Fix: e.g. "
                "rename={'^encoder/': 'backbone/'}."
            ),
        ):
            jc.restore(path, target, prefix="a", rename=123)
        with pytest.raises(
            ValueError,
            match=re.escape("rename's pattern '(' is not a valid regular expression (missing )"),
        ):
            jc.restore(path, target, rename={"(": "a/"})
        with pytest.raises(
            TypeError,
            match=re.escape(
                "rename maps regex patterns (str) to replacements (str), but it holds "
            ),
        ):
            jc.restore(path, target, rename={"^": 1})
        with pytest.raises(TypeError, match="prefix must be a path in the checkpoint"):
            jc.match(path, target, prefix=["a"])
        got = jc.restore(path, {"x": np.zeros(3)}, rename={"^x$": "a/w"})
        np.testing.assert_array_equal(got["x"], np.ones(3))


@pytest.mark.parametrize("packed", [False, True])
def test_reading_outside_a_leaf_is_an_index_error(tmp_path, packed, monkeypatch):
    if packed:
        monkeypatch.setattr(jc.checkpoint.plan, "PACK_MIN_LEAVES", 1)
    w = np.arange(6.0).reshape(2, 3)
    path = jc.save(tmp_path / "c", {"w": w})
    reader = jc.open(path)
    assert ("packed" in reader.record("w")) is packed
    with pytest.raises(IndexError) as e:
        reader.read("w", (5,))
    assert str(e.value) == (
        f"The index (5,) does not fit the leaf 'w' of shape (2, 3) in the checkpoint {path} "
        "(index 5 is out of bounds for axis 0 with size 2). Fix: index within that shape; "
        "reader.read(path) reads the whole leaf."
    )
    assert not isinstance(e.value, jc.CorruptCheckpointError)
    with pytest.raises(IndexError, match=r"The index \(0, 0, 0\) does not fit the leaf 'w'"):
        reader.read("w", (0, 0, 0))
    # Within the shape, an index means what it means to NumPy (negative, clipped, reversed).
    for index in [(1,), (-1,), (slice(0, 10),), (slice(5, 1),), (slice(None), -2), 1, (..., 1)]:
        got = reader.read("w", index)
        assert got.shape == w[index].shape and np.array_equal(got, w[index]), index


# ---------------------------------------------------------------------------- directories


def test_a_manager_of_a_checkpoint_is_refused(tmp_path):
    path = jc.save(tmp_path / "ckpt-3", tree_of(3))
    before = _files(path)
    with pytest.raises(jc.CheckpointError) as e:
        jc.CheckpointManager(path)
    assert str(e.value) == (
        f"{path} is a checkpoint (it holds COMMIT), not a directory of checkpoints: a manager "
        "would write its checkpoints inside it. Fix: give the manager the run's directory (the "
        f"one holding ckpt-<step> checkpoints), or read this checkpoint with jc.restore({path!r})."
    )
    assert _files(path) == before
    assert jc.CheckpointManager(tmp_path).steps == [3]  # its parent is a manager's directory


@pytest.mark.parametrize("read", ["restore", "open"])
def test_restoring_a_managers_directory_says_so(tmp_path, read):
    d = os.fspath(tmp_path / "run")
    with jc.CheckpointManager(d) as m:
        m.save(1, tree_of(1))
        m.save(2, tree_of(2))
    with pytest.raises(jc.CheckpointNotFoundError) as e:
        getattr(jc, read)(d)
    assert str(e.value) == (
        f"{d} is a CheckpointManager's directory (2 checkpoints, the newest ckpt-2), not one "
        f"checkpoint. Fix: restore one of them: jc.restore(jc.latest_checkpoint({d!r}), ...) for "
        f"the newest, or jc.CheckpointManager({d!r}).restore(step, target)."
    )
    assert_tree_equal(jc.restore(jc.latest_checkpoint(d)), tree_of(2))  # the advice works
    empty = os.fspath(tmp_path / "empty")
    jc.CheckpointManager(empty)
    with pytest.raises(jc.CheckpointNotFoundError) as e:
        jc.restore(empty)
    assert str(e.value) == (
        f"{empty} is a CheckpointManager's directory (no checkpoint yet), not one checkpoint. "
        "Fix: check the path, or save a checkpoint there first (CheckpointManager.save)."
    )


# ---------------------------------------------------------------------------- restore(target)


@pytest.mark.parametrize("async_save", [False, True])
def test_restore_takes_the_target_positionally(tmp_path, async_save):
    m = jc.CheckpointManager(tmp_path, async_save=async_save, max_to_keep=None)
    m.save(1, tree_of(1))
    m.save(2, tree_of(2))
    target = {"w": np.zeros((2, 3), np.float64), "step": 0}
    got = m.restore(target)  # as jc.restore(path, target): the latest step
    assert got["w"].dtype == np.float64 and got["step"] == 2
    np.testing.assert_array_equal(got["w"], tree_of(2)["w"])
    assert m.restore(1, target)["step"] == 1
    assert m.restore(step=1, target=target)["step"] == 1
    assert m.restore(target=target)["step"] == 2
    assert_tree_equal(m.restore(1), tree_of(1))
    assert_tree_equal(m.restore(), tree_of(2))
    with pytest.raises(TypeError) as e:
        m.restore(target, target)
    assert str(e.value) == (
        "restore's first argument is a step (an int) or, alone, the target; it was given a dict "
        "and a target as well. Fix: mngr.restore(target) for the latest step, or "
        "mngr.restore(step, target)."
    )
    with pytest.raises(ValueError, match="step must be a non-negative int, not -1"):
        m.restore(-1)
    m.close()


# ---------------------------------------------------------------------------- peer conventions


@pytest.mark.parametrize("async_save", [False, True])
def test_a_loop_resumed_at_a_saved_step_does_not_fail(tmp_path, async_save):
    d = os.fspath(tmp_path)
    with jc.CheckpointManager(d, save_interval_steps=10, max_to_keep=None) as m:
        for step in range(0, 51):
            m.save(step, tree_of(step))
    assert m.steps == [0, 10, 20, 30, 40, 50]
    m = jc.CheckpointManager(d, save_interval_steps=10, max_to_keep=None, async_save=async_save)
    assert [m.should_save(s) for s in (40, 50, 55, 60)] == [False, False, False, True]
    state = m.restore(target=tree_of(0))
    for step in range(state["step"], 71):  # the loop starts again at the restored step
        m.save(step, tree_of(step))
        assert not m.should_save(step)  # saved, or being saved
    m.close()
    assert m.steps == [0, 10, 20, 30, 40, 50, 60, 70] == on_disk(d)[0]
    assert_tree_equal(m.restore(50), tree_of(50))  # not overwritten
    with pytest.raises(jc.CheckpointExistsError, match=r"Step 50 is already saved"):
        m.save(50, tree_of(51), force=True)
    assert m.save(45, tree_of(45), force=True) is True  # force saves an older step
    m.close()
    assert 45 in m.steps


def test_best_metric_keeps_saves_without_it_by_recency(tmp_path):
    d = os.fspath(tmp_path)
    losses = {1: 5.0, 2: 1.0, 3: None, 4: 3.0, 5: None, 6: 9.0}
    with jc.CheckpointManager(d, max_to_keep=2, best_metric="loss") as m:
        for step, loss in losses.items():
            metrics = {"acc": 0.5} if loss is None else {"loss": loss}
            assert m.save(step, tree_of(step), metrics=metrics) is True
    # The best two by loss (2, 4), the newest (6), and the unranked among the newest two (5).
    assert m.steps == [2, 4, 5, 6] == on_disk(d)[0]
    assert m.best_step == 2 and m.metrics(5) == {"acc": 0.5}
    again = jc.CheckpointManager(d, max_to_keep=2, best_metric="loss", async_save=False)
    assert again.best_step == 2
    again.save(7, tree_of(7))  # no metrics at all
    # 6 ranks third; 5 is no longer among the newest two.
    assert again.steps == [2, 4, 7] and again.best_step == 2


def test_an_old_index_with_array_metrics_is_not_ranked(tmp_path):
    """Earlier versions stored array metrics (in a checkpoint's metadata, which a rebuilt
    index takes them from); ranking skips them instead of failing."""
    d = os.fspath(tmp_path)
    with jc.CheckpointManager(d, max_to_keep=None) as m:
        for step in (1, 2):
            m.save(step, tree_of(step), metrics={"loss": float(step)})

    def array_metric(doc):
        doc["attributes"]["jaxckpt"]["metrics"] = {"loss": [1.0, 1.0]}

    edit_metadata(os.path.join(d, "ckpt-1"), "zarr.json", array_metric)
    os.remove(os.path.join(d, "checkpoint"))
    m = jc.CheckpointManager(d, max_to_keep=1, best_metric="loss", async_save=False)
    assert m.metrics(1) == {"loss": [1.0, 1.0]}
    assert m.best_step == 2
    m.save(3, tree_of(3), metrics={"loss": 0.5})
    assert m.steps == [3] and m.best_step == 3


# ---------------------------------------------------------------------------- verify's advice


def test_verify_advice_to_skip_damaged_leaves_works(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(jc.checkpoint.plan, "PACK_BELOW", 0)  # every leaf its own array
    saved = {"enc": {"w": np.full((4, 4), 2.0)}, "head": {"w": np.full(4, 3.0)}, "step": 7}
    path = jc.save(tmp_path / "ckpt", saved)
    chunk = os.path.join(path, "head", "w", "c", "0")
    data = bytearray(open(chunk, "rb").read())
    data[2] ^= 0x10
    open(chunk, "wb").write(bytes(data))
    assert main(["verify", "-q", path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == [
        f"1 of 2 arrays in {path} are damaged. Fix: restore an earlier checkpoint (`jaxckpt ls` "
        "lists them), or restore this one with the damaged leaves left at the target's own "
        "values:",
        "  damaged = {'head/w'}",
        f'  jc.restore({path!r}, target, partial=True, missing="keep", rename=lambda p: None if '
        "p in damaged else p)",
    ]
    target = {"enc": {"w": np.zeros((4, 4))}, "head": {"w": np.full(4, -1.0)}, "step": 0}
    scope = {"jc": jc, "target": target}
    exec(out[-2].strip(), scope)  # follow the advice as printed
    restored = eval(out[-1].strip(), scope)
    np.testing.assert_array_equal(restored["enc"]["w"], saved["enc"]["w"])
    np.testing.assert_array_equal(restored["head"]["w"], target["head"]["w"])
    assert restored["step"] == 7
    with pytest.raises(jc.CorruptCheckpointError):
        jc.restore(path, target)
