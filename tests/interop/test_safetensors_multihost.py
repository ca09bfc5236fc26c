"""A safetensors file restored onto a mesh by 2 JAX processes: each reads only the bytes of
the slices its own devices hold, and gets them bit for bit."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import safetensors.numpy as stn
from test_orbax_multihost import _launch

WORKER = os.path.join(os.path.dirname(__file__), "safetensors_multihost_worker.py")


def test_two_processes_read_only_their_byte_ranges(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 4096)).astype(np.float32)
    a[0, :3] = [np.nan, -0.0, np.inf]
    b = rng.standard_normal((16, 8192)).astype(ml_dtypes.bfloat16)
    stn.save_file({"a.w": a, "b.w": b}, str(tmp_path / "model.safetensors"))
    header = (tmp_path / "model.safetensors").stat().st_size - a.nbytes - b.nbytes
    _launch(2, str(tmp_path), worker=WORKER)
    total = a.nbytes + b.nbytes
    for pid in range(2):
        got = json.loads((tmp_path / f"result-{pid}.json").read_text())
        assert all(case["exact"] for case in got.values()), got
        # Sharded 4 ways, 2 devices a process: half of each tensor (the header is read once
        # per restore, 8 bytes and its JSON).
        assert got["rows"]["bytes"] == total // 2 + header
        assert got["columns"]["bytes"] == total // 2 + header
        assert got["replicated"]["bytes"] == total + header
