"""examples/fine_tune_pretrained.py runs: a pretrained encoder from a safetensors file and from
an Orbax checkpoint into a classifier with a new head, one jc.restore call each."""

import os
import subprocess
import sys
from pathlib import Path

import jaxckpt as jc

ROOT = Path(__file__).resolve().parents[2]


def test_runs(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fine_tune_pretrained.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    if proc.returncode:
        raise jc.CheckpointError(proc.stderr[-2000:])
    assert proc.stdout.splitlines() == [
        f"safetensors: restored the encoder from {tmp_path}/model.safetensors; the 3-class "
        "head and adapter are new",
        f"Orbax: restored the encoder from {tmp_path}/orbax/1000; the 3-class head and adapter "
        "are new",
    ]
