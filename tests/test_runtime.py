"""The process-wide state lives in jaxckpt.runtime: pools, saves in flight, buffers, the
TensorStore context, exit hooks (through public APIs only) and reset()."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxckpt as jc
from jaxckpt import runtime as _runtime

ROOT = Path(__file__).resolve().parents[1]


def test_a_script_ending_with_saves_in_flight_commits_them(tmp_path):
    """The exit hook is an ``atexit`` one; the pools' daemon threads still write then."""
    script = (
        "import numpy as np, jaxckpt as jc\n"
        f"for i in range(3):\n"
        f"    jc.save_async({str(tmp_path)!r} + f'/c{{i}}', {{'w': np.full(2**20, i, np.float32)}})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    for i in range(3):
        np.testing.assert_array_equal(jc.restore(tmp_path / f"c{i}")["w"], np.full(2**20, i))


def test_no_private_threading_hook_and_no_environment_write():
    """Exit hooks use public APIs; settings are read from the environment, not written, but
    for the GCS emulator variable TensorStore has no spec member for (docs/object_stores.md)."""
    for path in (ROOT / "jaxckpt").rglob("*.py"):
        source = path.read_text()
        assert "_register_atexit" not in source, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ"
                for t in node.targets
            ):
                assert path == ROOT / "jaxckpt" / "storage" / "kvstore.py", (
                    path,
                    ast.unparse(node),
                )


def test_reset_forgets_saves_buffers_and_the_context(tmp_path):
    jc.save_async(tmp_path / "a", {"w": np.ones(1 << 16, np.float32)}).wait()
    assert _runtime.pooled_bytes() > 0  # kept for the next snapshot
    context = _runtime.context()
    try:
        jc.set_storage_options("s3", endpoint="http://127.0.0.1:1")
        jc.save_async(tmp_path / "b", {"w": np.ones(1 << 16, np.float32)})
        assert _runtime.unfinished
    finally:
        _runtime.reset()
    assert not _runtime.unfinished and _runtime.last is None
    assert _runtime.pooled_bytes() == 0 and _runtime.held_bytes() == 0
    assert _runtime.context() is not context and _runtime.storage_options["s3"] == {}
    assert jc.restore(tmp_path / "b")["w"].sum() == 1 << 16  # reset waited for it


def test_pool_sizes_are_settable(tmp_path):
    before = _runtime.pool("copy")
    try:
        _runtime.set_pool_sizes(copy=3)
        assert len(_runtime.pool("copy").threads) == 3 and _runtime.pool("copy") is not before
        jc.save_async(tmp_path / "a", {"w": np.ones(10)}).wait()  # snapshots use the new pool
    finally:
        _runtime.set_pool_sizes(copy=_runtime._default_sizes()["copy"])
    with pytest.raises(ValueError, match=r"pool sizes are positive ints of the kinds"):
        _runtime.set_pool_sizes(copy=0)
    with pytest.raises(ValueError, match=r"pool sizes are positive ints of the kinds"):
        _runtime.set_pool_sizes(nope=2)
