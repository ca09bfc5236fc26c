"""Tree comparison for the core tests: structure first, then every leaf bit-exactly."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def assert_leaf_equal(got: Any, want: Any, where: str = "") -> None:
    """Same type family, dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if isinstance(want, (jax.Array, np.ndarray, np.generic)):
        assert type(got) is type(want) or (
            isinstance(got, jax.Array) and isinstance(want, jax.Array)
        ), f"{where}: {type(got)} != {type(want)}"
        g, w = np.asarray(got), np.asarray(want)
        assert g.dtype == w.dtype, f"{where}: {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{where}: {g.shape} != {w.shape}"
        np.testing.assert_array_equal(
            np.frombuffer(g.tobytes(), np.uint8), np.frombuffer(w.tobytes(), np.uint8), where
        )
        if g.dtype.type.__module__ == "numpy":  # ml_dtypes compare NaN unequal: bytes above
            np.testing.assert_array_equal(g, w, where)
    else:
        assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
        if isinstance(want, float) and want != want:
            assert got != got, where
        else:
            assert got == want, f"{where}: {got!r} != {want!r}"


def assert_tree_equal(got: Any, want: Any) -> None:
    """Compares the tree structures, then each pair of leaves with :func:`assert_leaf_equal`."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (kp, g), w in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want), strict=True
    ):
        assert_leaf_equal(g, w, jax.tree_util.keystr(kp))


def files_under(root: str | os.PathLike[str]) -> set[str]:
    """Every file below ``root``, as paths relative to it."""
    out = set()
    for d, _, names in os.walk(root):
        for n in names:
            out.add(os.path.relpath(os.path.join(d, n), root))
    return out


def rewrite_metadata(ckpt: str | os.PathLike[str], key: str, value: Any) -> None:
    """Writes the metadata file ``ckpt/key`` (``value``: bytes, or a JSON value encoded as
    jaxckpt encodes it) and the checksum ``COMMIT`` holds for it: the checkpoint reads as if a
    save had written it (a crafted checkpoint, not a damaged one)."""
    from jaxckpt.format import checksum as _checksum
    from jaxckpt.storage import chunk_files as _chunks

    data = value if isinstance(value, bytes) else _chunks.json_bytes(value)
    with open(os.path.join(ckpt, key), "wb") as f:
        f.write(data)
    commit = os.path.join(ckpt, "COMMIT")
    with open(commit, "rb") as f:
        doc = json.load(f)
    del doc["crc32c"]
    doc["zarr_json_crc32c"][key] = _checksum.crc32c_bytes(data)
    with open(commit, "wb") as f:
        f.write(_checksum.seal(_chunks.json_bytes(doc)))


def edit_metadata(ckpt: str | os.PathLike[str], key: str, fn: Callable[[Any], Any]) -> None:
    """Applies ``fn`` to the parsed metadata file ``ckpt/key`` (in place, or returning the new
    value) and rewrites it with :func:`rewrite_metadata`."""
    with open(os.path.join(ckpt, key), "rb") as f:
        doc = json.load(f)
    out = fn(doc)
    rewrite_metadata(ckpt, key, doc if out is None else out)
