"""The notebooks of colab/: each starts with the install cell, keeps its outputs, is in the docs
site, and runs top to bottom (the sharded and fine-tuning ones here; see also test_demo.py,
test_cli.py and test_docs.py)."""

import json
import os
import re
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def _install_cell(nb):
    return next(c.source for c in nb.cells if 'find_spec("jaxckpt")' in c.source)


def test_every_notebook_starts_with_the_install_cell_keeps_its_outputs_and_is_in_the_site():
    reference = _install_cell(nbformat.read(ROOT / "colab" / "seed_guide.ipynb", as_version=4))
    index = (ROOT / "docs" / "index.md").read_text()
    assert len(NOTEBOOKS) >= 4
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert first_code.source == reference, path.name
        code = [c for c in nb.cells if c.cell_type == "code"]
        shows = [c for c in code[1:] if re.search(r"^(print|jaxckpt|display)\(", c.source, re.M)]
        assert shows and all(c.outputs for c in shows), f"{path.name}: run it and save its outputs"
        assert not any(o.output_type == "error" for c in code for o in c.outputs), path.name
        assert f"notebooks/{path.stem}\n" in index, f"add {path.stem} to docs/index.md"


def _run(name, tmp_path, monkeypatch):
    """Executes colab/NAME.ipynb in a fresh kernel (which imports this checkout's jaxckpt)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(ROOT / "colab" / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    return "\n".join(
        o.get("text", "") or json.dumps(o.get("data", {}))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


def test_the_sharded_arrays_notebook_restores_onto_other_meshes(tmp_path, monkeypatch):
    out = _run("sharded_arrays", tmp_path, monkeypatch)
    assert "8 devices:" in out  # XLA_FLAGS set by the notebook itself, before jax
    assert "spec=P('data', 'model')" in out and "8 shards of shape (16, 16)" in out
    assert re.search(r"Mesh\('data': 2, 'model': 4.*\n8 shards of shape \(32, 8\)", out)
    assert "kernel: P('batch',), shards of shape (8, 32)" in out
    assert "bias: P('batch',), shards of shape (4,)" in out
    assert "SingleDeviceSharding" in out and "<class 'numpy.ndarray'> bfloat16 1000" in out
    assert "params/dense/kernel  (64, 32)  float32" in out  # jaxckpt inspect
    assert "{'bias': ((32,), \"P('model',)\"), 'kernel': ((64, 32)" in out  # one subtree


def test_the_fine_tuning_notebook_restores_only_the_encoder(tmp_path, monkeypatch):
    out = _run("fine_tuning", tmp_path, monkeypatch)
    assert "kept as initialised (the checkpoint lacks them): ['params/classes/bias'," in out
    assert "the encoder is the pretrained one; the head is new: (16, 2)" in out
    losses = [float(v) for v in re.findall(r"(?:loss|step|more):? (\d+\.\d+)\n", out)]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0], out
    assert "Converted the Orbax checkpoint" in out
    assert "params/encoder/out/kernel     (32, 16)" in out
    assert "from the Orbax checkpoint, the same encoder" in out


def test_the_graph_is_shown_inline_as_svg_in_the_stored_outputs():
    nb = nbformat.read(ROOT / "colab" / "inspect_and_convert.ipynb", as_version=4)
    [cell] = [c for c in nb.cells if c.source.startswith('jaxckpt("graph"')]
    [svg] = [o.data["image/svg+xml"] for o in cell.outputs if "image/svg+xml" in o.get("data", {})]
    assert svg.lstrip().startswith(("<svg", "<?xml")) and "params" in svg and "</svg>" in svg
