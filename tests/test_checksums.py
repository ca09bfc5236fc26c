"""Metadata checksums: COMMIT records the CRC-32C of every zarr.json a save writes, and of
itself; readers check them, ``verify`` reports any mismatch; version 2 checkpoints stay readable."""

from __future__ import annotations

import os

import pytest
import v2_trees
from core_helpers import assert_tree_equal

import jaxckpt as jc
from jaxckpt.cli import main

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
