"""Property-based fuzzing of the metadata: damaged ``zarr.json``, ``COMMIT`` and index files.

Each case damages one file of a small checkpoint (a dict of arrays, a packed tree of 64 small
leaves, a tree whose record is split over its groups, a manager's run) by a random bit flip, a
byte set to a random value, a truncation, or an edit that keeps the JSON valid but wrong (a
number changed, a value swapped for another, a key renamed or deleted, a value's type changed).
Then ``restore``, ``open``, ``list_variables`` and ``jaxckpt verify`` either give the correct
result or raise ``CorruptCheckpointError`` naming the file, and ``verify`` exits 1; a manager
on a run with a damaged index gives the correct steps, metrics and best step, and its
retention keeps the true best checkpoint.

The checkpoints are saved once; each case changes one file in place and puts its bytes back.
Hypothesis runs derandomized (the same cases on every run) without an example database.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import jaxckpt as jc
from jaxckpt.storage import chunk_files as _chunks
from jaxckpt.tools.cli import main


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ---------------------------------------------------------------------------- the checkpoints


def _plain() -> dict[str, Any]:
    return {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "b": np.array([1, -2, 3], np.int64),
        "z": np.zeros((4, 3), np.float64),  # its chunk is not written: fill_value matters
        "t": (np.float32(2.5), {"n": 7, "name": "x", "f": 0.5}),
    }


def _packed() -> dict[str, Any]:
    return {f"k{i}": np.arange(3, dtype=np.float32) + i for i in range(64)}


def _split() -> dict[str, Any]:
    return {
        f"b{b}": {f"l{i}": np.full((2,), b * 100 + i, np.int32) for i in range(50)}
        for b in range(24)
    }


def _digest(tree: Any) -> str:
    """Every leaf's key path, type, dtype, shape and bytes (the whole result, bit for bit)."""
    h = hashlib.sha256()
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        h.update(f"{jax.tree_util.keystr(kp)}|{type(leaf).__name__}|".encode())
        if isinstance(leaf, (np.ndarray, np.generic)):
            h.update(f"{leaf.dtype}|{leaf.shape}|".encode())
            h.update(np.ascontiguousarray(leaf).tobytes())
        else:
            h.update(repr(leaf).encode())
    h.update(str(jax.tree_util.tree_structure(tree)).encode())
    return h.hexdigest()


def _results(path: str) -> dict[str, Any]:
    """What each reading API returns for ``path``."""
    reader = jc.open(path)
    return {
        "restore": _digest(jc.restore(path)),
        "open": (reader.step, reader.metrics, reader.metadata["time"], reader.paths),
        "list_variables": jc.list_variables(path),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    """``{name: (path, its metadata files, the correct results)}``."""
    base = tmp_path_factory.mktemp("fuzz")
    out = {}
    for name, tree in (("plain", _plain), ("packed", _packed), ("split", _split)):
        path = jc.save(base / name, tree(), step=10, metrics={"loss": 0.25})
        files = sorted(
            os.path.relpath(os.path.join(d, f), path)
            for d, _, fs in os.walk(path)
            for f in fs
            if f in ("zarr.json", "COMMIT")
        )
        out[name] = (path, files, _results(path))
    assert len(out["split"][1]) > 24 and "~pack/0/zarr.json" in out["packed"][1]
    return out


# ---------------------------------------------------------------------------- damage


def _nodes(x: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path to every value inside the JSON value ``x`` (not ``x`` itself)."""
    out = []
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else []
    for k, v in items:
        out.append((*at, k))
        out += _nodes(v, (*at, k))
    return out


def _edit(draw: Any, doc: Any) -> Any:
    """``doc`` changed in one place, still valid JSON."""
    doc = copy.deepcopy(doc)
    paths = _nodes(doc)
    if not paths:
        return draw(st.sampled_from([[], 0, None, {"zarr_format": 3}]))
    at = draw(st.sampled_from(paths))
    parent = doc
    for k in at[:-1]:
        parent = parent[k]
    key, value = at[-1], parent[at[-1]]
    op = draw(st.sampled_from(["number", "swap", "rename", "delete", "string", "type"]))
    if op == "number":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            delta = draw(st.sampled_from([1, -1, 2, 1 << 31, -value]))
            parent[key] = value + delta if delta != -value else -value
        else:
            parent[key] = draw(st.integers(-3, 1 << 40))
    elif op == "swap":
        other = draw(st.sampled_from(paths))
        v = doc
        for k in other:
            v = v[k]
        parent[key] = copy.deepcopy(v)
    elif op == "rename" and isinstance(parent, dict):
        keys = [p[-1] for p in paths if isinstance(p[-1], str)]
        new = draw(st.sampled_from([*keys, f"{key}_", key.upper(), ""]))
        items = [(new if k == key else k, v) for k, v in parent.items()]
        parent.clear()
        parent.update(items)
    elif op in ("delete", "rename"):
        del parent[key]
    elif op == "string":
        parent[key] = draw(st.text(max_size=6))
    else:
        parent[key] = draw(st.sampled_from([None, True, False, [], {}, "", 0, 0.5, [1], {"t": 1}]))
    return doc


def _damage(draw: Any, data: bytes, indent: int | None = None) -> bytes:
    """``data`` with one random kind of damage (never the same bytes)."""
    kind = draw(st.sampled_from(["flip", "byte", "truncate", "json", "json"]))
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        bad = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
    elif kind == "byte":
        i = draw(st.integers(0, len(data) - 1))
        bad = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    elif kind == "truncate":
        bad = data[: draw(st.integers(0, len(data) - 1))]
    else:
        doc = _edit(draw, json.loads(data))
        bad = json.dumps(doc, indent=indent).encode() if indent else _chunks.json_bytes(doc)
    assume(bad != data)
    event(f"damage: {kind}")
    return bad


@contextlib.contextmanager
def _damaged(path: str, data: bytes):
    """``path`` holds ``data`` inside; its own bytes again after."""
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(data)
    try:
        yield
    finally:
        with open(path, "wb") as f:
            f.write(good)


# ---------------------------------------------------------------------------- the properties


def _check_reading(path: str, rel: str, want: dict[str, Any]) -> None:
    """Every reading API gives the correct result or names the damaged file; verify exits 1."""
    named = os.path.join(path, rel)
    for api, fn in (
        ("restore", lambda: _digest(jc.restore(path))),
        ("open", lambda: _results_open(path)),
        ("list_variables", lambda: jc.list_variables(path)),
    ):
        try:
            got = fn()
        except jc.CorruptCheckpointError as e:
            assert named in str(e), (api, rel, str(e))
            event(f"{api}: CorruptCheckpointError")
        else:
            assert got == want[api], (api, rel)
            event(f"{api}: the correct result")
    out = io.StringIO()
    assert main(["verify", "-q", path], out=out) == 1, (rel, out.getvalue())
    assert named in out.getvalue(), (rel, out.getvalue())


def _results_open(path: str) -> Any:
    reader = jc.open(path)
    return (reader.step, reader.metrics, reader.metadata["time"], reader.paths)


def _fuzz(saved: Any, name: str, data: Any, files: list[str] | None = None) -> None:
    path, all_files, want = saved[name]
    rel = data.draw(st.sampled_from(files or all_files), label="file")
    with open(os.path.join(path, rel), "rb") as f:
        good = f.read()
    bad = _damage(data.draw, good)
    with _damaged(os.path.join(path, rel), bad):
        _check_reading(path, rel, want)


@_settings(1500)
@given(data=st.data())
def test_damaged_metadata_of_a_dict_of_arrays(saved, data):
    _fuzz(saved, "plain", data)


@_settings(800)
@given(data=st.data())
def test_damaged_metadata_of_a_packed_tree(saved, data):
    _fuzz(saved, "packed", data)


@_settings(400)
@given(data=st.data())
def test_damaged_metadata_of_a_split_record(saved, data):
    _fuzz(saved, "split", data)


@_settings(1500)
@given(data=st.data())
def test_damaged_root_or_commit(saved, data):
    """The two files every open reads, for each checkpoint."""
    name = data.draw(st.sampled_from(["plain", "packed", "split"]), label="checkpoint")
    _fuzz(saved, name, data, files=["COMMIT", "zarr.json"])


# ---------------------------------------------------------------------------- the index


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, dict[str, Any]]:
    """A manager's run of 4 steps, the best first, and what a manager says of it."""
    d = os.fspath(tmp_path_factory.mktemp("run"))
    with jc.CheckpointManager(d, max_to_keep=None, best_metric="loss", async_save=False) as m:
        for step, loss in ((1, 0.5), (2, 2.0), (3, 1.5), (4, float("nan"))):
            m.save(step, {"w": np.full(2, step)}, metrics={"loss": loss, "acc": step / 10})
    m = jc.CheckpointManager(d, max_to_keep=None, best_metric="loss", async_save=False)
    return d, _manager_says(m)


def _manager_says(m: jc.CheckpointManager) -> dict[str, Any]:
    return {
        "steps": m.steps,
        "best": m.best_step,
        "latest": m.latest_step,
        "metrics": json.dumps({s: m.metrics(s) for s in m.steps}),
    }


@_settings(1000)
@given(data=st.data())
def test_damaged_index(run, data):
    d, want = run
    index = os.path.join(d, "checkpoint")
    with open(index, "rb") as f:
        good = f.read()
    with _damaged(index, _damage(data.draw, good, indent=1)):
        m = jc.CheckpointManager(d, max_to_keep=None, best_metric="loss", async_save=False)
        assert _manager_says(m) == want
        out = io.StringIO()
        assert main(["ls", d], out=out) == 0


@_settings(40)
@given(data=st.data())
def test_damaged_index_then_retention_keeps_the_best(run, data, tmp_path_factory):
    """A save with ``max_to_keep=1`` on a copy of the run (damaged index and all) keeps the
    best step (1) and the newest, deleting the rest."""
    d, _ = run
    copy_of_run = shutil.copytree(d, tmp_path_factory.mktemp("copy") / "run")
    index = os.path.join(copy_of_run, "checkpoint")
    with open(index, "rb") as f:
        good = f.read()
    with open(index, "wb") as f:
        f.write(_damage(data.draw, good, indent=1))
    m = jc.CheckpointManager(copy_of_run, max_to_keep=1, best_metric="loss", async_save=False)
    m.save(5, {"w": np.full(2, 5)}, metrics={"loss": 3.0, "acc": 0.5})
    assert m.steps == [1, 5] and m.best_step == 1
    assert sorted(n for n in os.listdir(copy_of_run) if n.startswith("ckpt-")) == [
        "ckpt-1",
        "ckpt-5",
    ]
    shutil.rmtree(copy_of_run)
