"""Stopping and resuming is invisible: 50 + 50 steps equal 100 uninterrupted steps, bit for bit."""

import importlib.util
import os
from pathlib import Path

import jax
import numpy as np

import jaxckpt as jc

ROOT = Path(__file__).resolve().parents[2]


def load_guide():
    spec = importlib.util.spec_from_file_location("seed_guide", ROOT / "examples" / "seed_guide.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_trees_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(g, w)


@jax.numpy_dtype_promotion("standard")  # optax's adam mixes an int32 count with float literals
def test_stop_and_resume_equals_uninterrupted_training(tmp_path):
    guide = load_guide()
    said = []

    with guide.new_manager(os.fspath(tmp_path / "straight")) as mngr:
        straight, losses = guide.train_and_checkpoint(guide.new_state(), mngr, 100, said.append)

    resumed_dir = os.fspath(tmp_path / "resumed")
    with guide.new_manager(resumed_dir) as mngr:
        first, losses_1 = guide.train_and_checkpoint(guide.new_state(), mngr, 50, said.append)
    assert first["iterator"].position == 100 and first["step"] == 50
    # A new process would start here: new model (another seed), optimizer, iterator, manager.
    with guide.new_manager(resumed_dir) as mngr:
        resumed, losses_2 = guide.train_and_checkpoint(
            guide.new_state(seed=1), mngr, 50, said.append
        )

    assert f"Restored from {resumed_dir}/ckpt-50" in said
    np.testing.assert_array_equal(np.array(losses_1 + losses_2), np.array(losses))
    assert resumed["step"] == straight["step"] == 100
    assert resumed["iterator"].position == straight["iterator"].position == 200
    assert_trees_equal(resumed["net"], straight["net"])
    assert_trees_equal(resumed["optimizer"], straight["optimizer"])
    # The checkpoints the two runs left are the same, iterator state included.
    assert mngr.steps == [80, 90, 100]
    a = jc.restore(f"{tmp_path}/straight/ckpt-100")
    b = jc.restore(f"{resumed_dir}/ckpt-100")
    assert a.pop("iterator") == b.pop("iterator") == {"position": 200}
    assert_trees_equal(a, b)
