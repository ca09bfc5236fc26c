"""`make demo` (examples/seed_guide.py) and its notebook (colab/seed_guide.ipynb) run the guide."""

import os
import re
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import numpy as np

import jaxckpt as jc

ROOT = Path(__file__).resolve().parents[1]
TABLE = [
    "  iterator                     []      state",
    "  net/l1/bias                  [5]     float32",
    "  net/l1/kernel                [1, 5]  float32",
    "  optimizer/0/count            []      int32",
    "  optimizer/0/mu/l1/bias       [5]     float32",
    "  optimizer/0/mu/l1/kernel     [1, 5]  float32",
    "  optimizer/0/nu/l1/bias       [5]     float32",
    "  optimizer/0/nu/l1/kernel     [1, 5]  float32",
    "  step                         []      int",
]


def with_root_on_path() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def check_guide_output(out: str, run_dir: Path) -> None:
    """What the guide prints (less its section titles), checked against the checkpoints it left."""
    lines = [line for line in out.splitlines() if line and not line.startswith("== ")]
    assert lines[0] == "Initializing from scratch.", out
    saved = re.findall(r"^Saved checkpoint for step (\d+): (\S+)\nloss (\d+\.\d\d)$", out, re.M)
    assert [int(s) for s, _, _ in saved] == list(range(10, 101, 10)), out
    assert [p for _, p, _ in saved] == [f"./tf_ckpts/ckpt-{s}" for s in range(10, 101, 10)]
    losses = [float(loss) for _, _, loss in saved]
    assert losses[-1] < losses[0] / 10, losses  # it learns, as in the guide (26.91 ... 0.30)
    restored = lines.index("Restored from ./tf_ckpts/ckpt-50")
    assert lines[restored - 1] == f"loss {saved[4][2]}"
    assert lines[restored + 1] == "Saved checkpoint for step 60: ./tf_ckpts/ckpt-60"
    assert "step 100, the iterator at position 200" in lines
    assert "['./tf_ckpts/ckpt-80', './tf_ckpts/ckpt-90', './tf_ckpts/ckpt-100']" in lines
    assert "['checkpoint', 'ckpt-100', 'ckpt-80', 'ckpt-90']" in lines
    table = lines.index(TABLE[0])
    assert lines[table : table + len(TABLE)] == TABLE

    latest = run_dir / "tf_ckpts" / "ckpt-100"
    reader = jc.open(latest)
    bias, kernel = reader["net/l1/bias"], reader["net/l1/kernel"]
    i = table + len(TABLE)
    assert lines[i : i + 5] == [
        str(np.zeros(5, np.float32)),
        "status.assert_existing_objects_matched(): passed",
        "status.assert_consumed() raised StructureMismatchError:",
        f"The checkpoint at {latest.resolve()} does not match the target.",
        "  Saved leaves the target lacks (8):",
    ]
    assert str(bias) in lines[i + 5 :]  # the bias, restored alone
    assert str(kernel) in lines  # restored into shapes
    assert f"9 leaves; reading one: net/l1/kernel = {kernel}" in lines
    mu = reader.read("optimizer/0/mu/l1/kernel", (0, slice(0, 2)))
    assert f"optimizer/0/mu/l1/kernel[0, :2] = {mu}" in lines
    assert lines[-2:] == ["mapped['two'] = 2.0", "listed[0] = 1.0"]
    assert sorted(os.listdir(run_dir / "tf_ckpts")) == [
        ".jaxckpt-writer",
        "checkpoint",
        "ckpt-100",
        "ckpt-80",
        "ckpt-90",
    ]
    assert jc.restore(run_dir / "tf_list_example")["listed"] == [np.float32(1.0), np.float32(2.0)]


def test_make_demo_prints_the_guide(tmp_path):
    # A previous run's checkpoints: the demo owns ./tf_ckpts and starts from scratch.
    jc.save(tmp_path / "tf_ckpts" / "ckpt-70", {"step": 70})
    jc.save(tmp_path / "tf_list_example", {"listed": [1]})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed_guide.py")],
        cwd=tmp_path,
        env=with_root_on_path(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("== Train and checkpoint\nInitializing from scratch.\n")
    check_guide_output(proc.stdout, tmp_path)
    # The README shows this output (numbers aside, which depend on the JAX version).
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## `make demo`: the seed guide in JAX")[1]
    shown = section.split("It prints")[1].split("```\n")[1]
    mask = re.compile(r"-?\d+\.\d*(e[+-]?\d+)?")
    got = proc.stdout.replace(str(tmp_path.resolve()), "/home/you/jaxckpt")
    assert mask.sub("#", shown) == mask.sub("#", got)


def test_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", with_root_on_path()["PYTHONPATH"])
    nb = nbformat.read(ROOT / "colab" / "seed_guide.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    out = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream" and o.name == "stdout"
    )
    check_guide_output(out, tmp_path)
