"""The docs site: ``make docs`` (Sphinx, MyST-NB, sphinx-book-theme) builds with no warning,
executing the notebooks, and the API reference documents every public name."""

import os
import re
import subprocess
import sys

import jaxckpt as jc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_api_reference_documents_every_public_name():
    with open(os.path.join(ROOT, "docs", "reference.md"), encoding="utf-8") as f:
        documented = set(re.findall(r"^\.\. auto\w+:: jaxckpt\.(\w+)", f.read(), re.M))
    public = {n for n in dir(jc) if not n.startswith("_") and not _is_module(getattr(jc, n))}
    assert public - documented == set(), "add these to docs/reference.md"
    assert documented - public == {"tools"}
    assert sorted(jc.__all__) == sorted(public)  # a star-import gets every public name


def _is_module(x):
    return type(x).__name__ == "module"


def test_the_site_builds_with_no_warning(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    sphinx = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    p = subprocess.run(
        [*sphinx, os.path.join(ROOT, "docs"), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    html = (tmp_path / "html" / "reference.html").read_text()
    assert 'id="jaxckpt.save"' in html and 'id="jaxckpt.CheckpointManager.save"' in html
    guide = (tmp_path / "html" / "notebooks" / "seed_guide.html").read_text()
    assert "Saved checkpoint for step 100" in guide  # the notebook, run (errors fail the build)
    sharded = (tmp_path / "html" / "notebooks" / "sharded_arrays.html").read_text()
    assert "8 shards of shape (32, 8)" in sharded  # restored onto another mesh
    tuned = (tmp_path / "html" / "notebooks" / "fine_tuning.html").read_text()
    assert "from the Orbax checkpoint, the same encoder" in tuned
    graph = (tmp_path / "html" / "notebooks" / "inspect_and_convert.html").read_text()
    assert re.search(r'<img [^>]*src="\.\./_images/\w+\.svg"', graph)  # the graph, as SVG
    assert 'id="jaxckpt.set_progress"' in html
