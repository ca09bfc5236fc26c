"""jaxckpt needs only what pyproject.toml's ``dependencies`` lists: a user of plain JAX saves,
restores and inspects without Flax, optax, orbax or safetensors installed."""

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter where importing these fails, as where they are not installed.
PLAIN_JAX = textwrap.dedent(
    """
    import importlib.abc, sys

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("flax", "optax", "orbax", "safetensors"):
                raise ImportError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, Absent())
    import jax.numpy as jnp
    import numpy as np
    import jaxckpt as jc

    tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": 7, "rng": jax_key}
    path = jc.save(sys.argv[1] + "/ckpt", tree)
    out = jc.restore(path, tree)
    np.testing.assert_array_equal(out["w"], tree["w"])
    assert jc.list_variables(path)[0][0] == "rng"
    mngr = jc.CheckpointManager(sys.argv[1] + "/run", max_to_keep=1)
    mngr.save(1, tree)
    mngr.wait_until_finished()
    assert mngr.latest_step == 1
    hidden = [m for m in sys.modules if m.split(".")[0] in ("flax", "optax", "orbax")]
    assert not hidden, hidden
    print("plain jax ok")
    """
).replace("jax_key", "__import__('jax').random.key(0)")


def test_plain_jax_needs_no_flax_optax_or_interop_libraries(tmp_path):
    p = subprocess.run(
        [sys.executable, "-c", PLAIN_JAX, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "plain jax ok\n"


def test_the_required_dependencies_are_what_the_readme_says():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0] for d in deps}
    assert names == {"jax", "tensorstore", "numpy", "google-crc32c", "msgpack"}
    readme = (ROOT / "README.md").read_text()
    assert "jaxckpt itself needs only JAX, TensorStore, NumPy, google-crc32c and msgpack" in readme
