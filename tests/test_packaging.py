"""The installable package: ``python -m build`` gives an sdist and a wheel (built from the
sdist), and the wheel alone, installed into a fresh virtual environment by the notebooks'
install cell, saves, restores and runs the ``jaxckpt`` command from outside the source tree,
and runs every notebook of ``colab/`` top to bottom.

Only the wheel's jaxckpt is importable there: the new environment reaches its dependencies
(jax, tensorstore, ...) through a ``.pth`` line naming this environment's site-packages, and
a plain path line in a ``.pth`` file does not run that directory's own ``.pth`` files, so an
editable install of the source tree stays out of sight.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import jaxckpt as jc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = (".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".*_cache", "tf_ckpts")

SMOKE = """
import os, sys
import jax.numpy as jnp
import numpy as np
import jaxckpt as jc

here = os.path.dirname(jc.__file__)
assert here.startswith(sys.prefix), (here, sys.prefix)
assert os.path.exists(os.path.join(here, "py.typed"))
state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": 7}
jc.save("ckpt-7", state, step=7)
back = jc.restore("ckpt-7", target=state)
np.testing.assert_array_equal(back["params"]["w"], state["params"]["w"])
assert back["step"] == 7
print("smoke ok", here)
"""

RUN_CELLS = """
import codeop, json
namespace = {"__name__": "__main__"}
compiler = codeop.Compile()  # like a kernel's: a __future__ import holds for later cells
for i, cell in enumerate(json.load(open("cells.json"))):
    exec(compiler(cell, f"<cell {i}>", "exec"), namespace)
"""


def install_cell():
    nb = json.loads((Path(ROOT) / "colab" / "seed_guide.ipynb").read_text())
    [cell] = [c for c in nb["cells"] if 'find_spec("jaxckpt")' in "".join(c["source"])]
    return "".join(cell["source"])


def _run(argv, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, f"{argv}\n{p.stdout}\n{p.stderr}"
    return p


def test_the_wheel_alone_works_in_a_fresh_virtual_environment(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP))
    dist = tmp_path / "dist"
    # --no-isolation: build with this environment's setuptools (the test extra), offline.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)])
    [sdist] = dist.glob("jaxckpt-*.tar.gz")
    [wheel] = dist.glob("jaxckpt-*-py3-none-any.whl")
    assert wheel.name == f"jaxckpt-{jc.__version__}-py3-none-any.whl"
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "jaxckpt/py.typed"} <= names
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"jaxckpt-{jc.__version__}.dist-info/METADATA").decode()
    modules = {  # every module, in the package's folders too
        str(f.relative_to(ROOT)) for f in Path(ROOT, "jaxckpt").rglob("*.py")
    }
    assert modules | {"jaxckpt/py.typed"} <= names
    assert f"jaxckpt-{jc.__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in meta and "Classifier: Typing :: Typed" in meta

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    with open(os.path.join(purelib.stdout.strip(), "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # the dependencies, not the source

    # The notebooks' install cell, as in a fresh Colab runtime with the wheel uploaded.
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(wheel, work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PIP_NO_INDEX"] = "1"  # every dependency is here already: nothing to download
    p = _run([str(python), "-c", install_cell()], cwd=work, env=env)
    assert p.stdout == f"installed jaxckpt from {wheel.name}\n"
    p = _run([str(python), "-c", SMOKE], cwd=work, env=env)
    assert p.stdout.startswith("smoke ok " + str(venv))
    cli = str(venv / "bin" / "jaxckpt")
    p = _run([cli, "--version"], cwd=work, env=env)
    assert p.stdout == f"jaxckpt {jc.__version__}\n"
    p = _run([cli, "inspect", "ckpt-7"], cwd=work, env=env)
    assert p.stdout.splitlines()[2].split() == ["params/w", "(2,", "3)", "float32", "24", "B"]

    # Each notebook top to bottom, its code cells run one after another in one namespace as a
    # kernel runs them, against the installed wheel alone (the install cell finds it there).
    for name in sorted(os.listdir(os.path.join(ROOT, "colab"))):
        if not name.endswith(".ipynb"):
            continue
        nb = json.loads((Path(ROOT) / "colab" / name).read_text())
        cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
        assert cells[0] == install_cell(), name
        run_dir = work / name.removesuffix(".ipynb")
        run_dir.mkdir()
        (run_dir / "cells.json").write_text(json.dumps(cells))
        _run([str(python), "-c", RUN_CELLS], cwd=run_dir, env=env)
