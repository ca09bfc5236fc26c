"""HTTP requests jaxckpt makes on S3 for W1- and W2-like trees, counted from moto's log.

    python benchmarks/objstore_requests.py [--w1-mib 64] [--w2-leaves 10000]

Starts moto_server on 127.0.0.1 (the test dependency), saves each tree to ``s3://`` once, then
restores it whole, reads one array lazily, and lists its variables, printing the requests
each step made by HTTP method. Request counts depend on the number of arrays and chunks, not
on their bytes, as long as no array passes the 64 MiB chunk size: ``--w1-mib`` scales W1's
bytes down (its ~100 arrays keep their count) so that moto holds it in memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import servers  # noqa: E402

import jaxckpt as jc  # noqa: E402
from jaxckpt.format import paths as _paths  # noqa: E402


def w1(total_mib: float) -> dict:
    """A transformer-like tree: embeddings + 12 blocks of 8 arrays (~100), with adam state."""
    # params = 152 d^2 floats (embed 8 d^2, 12 blocks of 12 d^2); with adam's mu and nu, x3
    d = max(64, 64 * round((total_mib * 2**20 / (152 * 4 * 3)) ** 0.5 / 64))
    rng = np.random.default_rng(0)

    def a(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    params: dict = {"embed": a(8 * d, d), "blocks": {}}
    for i in range(12):
        params["blocks"][f"b{i}"] = {
            "attn": {"qkv": a(d, 3 * d), "out": a(d, d)},
            "mlp": {"up": a(d, 4 * d), "down": a(4 * d, d)},
            "ln1": {"scale": a(d), "bias": a(d)},
            "ln2": {"scale": a(d), "bias": a(d)},
        }
    return {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": 1}


def w2(leaves: int) -> dict:
    """``leaves`` float32 arrays of 1-64 KiB in nested dicts (100 per inner dict)."""
    rng = np.random.default_rng(0)
    tree: dict = {}
    for i, n in enumerate(rng.integers(256, 16 * 1024, leaves)):
        tree.setdefault(f"g{i // 100}", {})[f"x{i % 100}"] = np.full(int(n), i, np.float32)
    return tree


def run(name: str, tree: dict, log: Path, base: str) -> None:
    path = f"{base}/{name}"
    steps = {
        "save": lambda: jc.save(path, tree),
        "restore (whole tree)": lambda: jc.restore(path),
        "jc.open + read one array": lambda: _read_one(jc.open(path), tree),
        "list_variables": lambda: jc.list_variables(path),
    }
    for step, fn in steps.items():
        before = log.stat().st_size
        fn()
        counts = servers.moto_requests(log, since=before)
        total = sum(counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"| {name} | {step} | {total} | {detail} |", flush=True)


def _read_one(reader: jc.Reader, tree: dict) -> None:
    """Reads the tree's first leaf by its path (without listing the checkpoint's leaves)."""
    reader[_paths.path_str(jax.tree_util.tree_flatten_with_path(tree)[0][0][0])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--w1-mib", type=float, default=64.0)
    ap.add_argument("--w2-leaves", type=int, default=10_000)
    args = ap.parse_args()
    log = Path(tempfile.mkdtemp()) / "moto.log"
    srv = servers.start_moto(log)
    try:
        servers.create_s3_bucket(srv.url, "bench")
        os.environ.update(servers.DUMMY_AWS, AWS_ENDPOINT_URL_S3=srv.url)
        t1, t2 = w1(args.w1_mib), w2(args.w2_leaves)
        n1, n2 = len(_arrays(t1)), len(_arrays(t2))
        print(f"W1: {n1} arrays, {_mib(t1):.0f} MiB; W2: {n2} arrays, {_mib(t2):.0f} MiB\n")
        print("| tree | operation | requests | by method |\n|---|---|---|---|")
        run("W1", t1, log, "s3://bench/run")
        run("W2", t2, log, "s3://bench/run")
    finally:
        srv.stop()


def _arrays(tree: dict) -> list:
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]


def _mib(tree: dict) -> float:
    return sum(np.asarray(x).nbytes for x in _arrays(tree)) / 2**20


if __name__ == "__main__":
    main()
