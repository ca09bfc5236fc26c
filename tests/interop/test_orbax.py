"""Orbax checkpoints written by orbax-checkpoint itself, read by jaxckpt: every layout, bit for
bit (bfloat16, NaN, -0.0, typed PRNG keys), with restore's options, the CLI and a manager."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt as jc
from jaxckpt.interop import orbax as orbax_reader
from jaxckpt.tools import cli as cli

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's info and warnings


def _tree():
    odd = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 1.5], np.float32)
    return {
        "params": {
            "w": jnp.asarray(odd, jnp.bfloat16),
            "b": jnp.asarray(odd),
            "layers": [jnp.arange(6, dtype=jnp.int32).reshape(2, 3), jnp.ones((3,), jnp.int8)],
        },
        "rng": jax.random.key(7),
        "rngs": jax.random.split(jax.random.key(3, impl="rbg"), 2),
        "step": np.int64(12),
        "name": "run-a",
    }


def _bits(x):
    arr = np.asarray(x)
    return (
        arr.view(f"u{arr.dtype.itemsize}")
        if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"
        else arr
    )


def _same(got, want):
    if jax.dtypes.issubdtype(getattr(want, "dtype", None), jax.dtypes.prng_key):
        assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(want))
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
        return
    if isinstance(want, str):
        assert got == want
        return
    assert np.asarray(got).dtype == np.asarray(want).dtype
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _save(path, tree, ocdbt=True, zarr3=False):
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)
    with ocp.Checkpointer(handler) as ck:
        ck.save(path, args=ocp.args.PyTreeSave(tree))
    return str(path)


@pytest.mark.parametrize("ocdbt", [True, False], ids=["ocdbt", "no-ocdbt"])
@pytest.mark.parametrize("zarr3", [True, False], ids=["zarr3", "zarr2"])
def test_every_layout_restores_bit_for_bit(tmp_path, ocdbt, zarr3):
    tree = _tree()
    path = _save(tmp_path / "ckpt", tree, ocdbt, zarr3)
    got = jc.restore(path)
    want = {**tree, "params": {**tree["params"], "layers": tree["params"]["layers"]}}
    jax.tree_util.tree_map(_same, got, want)
    assert isinstance(got["params"]["layers"], list)
    # Into a target: the target's types and dtypes, typed keys as typed keys.
    target = jax.tree_util.tree_map(jnp.zeros_like, {k: v for k, v in tree.items() if k != "name"})
    target["name"], target["step"] = "", np.int64(0)
    back = jc.restore(path, target)
    jax.tree_util.tree_map(_same, back, tree)
    assert isinstance(back["params"]["w"], jax.Array)
    assert ("rng", (), "key<fry>") in jc.list_variables(path)
    assert ("rngs", (2,), "key<rbg>") in jc.list_variables(path)


def test_none_and_empty_containers_restore(tmp_path):
    """Were dropped: Orbax records them in _METADATA, and jaxckpt rebuilds them as Orbax's own
    restore does (a tuple that holds leaves comes back a list there too)."""
    tree = {
        "a": jnp.ones(2),
        "none": None,
        "ed": {},
        "el": [],
        "et": (),
        "nested": {"x": [None, {}, jnp.zeros(1)], "t": (jnp.int32(1), ())},
    }
    for ocdbt in (True, False):
        path = _save(tmp_path / f"ckpt-{ocdbt}", tree, ocdbt)
        with ocp.StandardCheckpointer() as ck:
            theirs = ck.restore(path)
        got = jc.restore(path)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(theirs)
        assert got["none"] is None and got["et"] == () and got["nested"]["x"][:2] == [None, {}]
        np.testing.assert_array_equal(got["nested"]["x"][2], np.zeros(1, np.float32))
        back = jc.restore(path, tree)  # the saved tree as its own target
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    # A JsonSave item's nulls and empty containers too.
    run = tmp_path / "run"
    with ocp.CheckpointManager(run) as mgr:
        mgr.save(1, args=ocp.args.Composite(meta=ocp.args.JsonSave({"a": None, "b": {}, "c": []})))
        mgr.wait_until_finished()
    assert jc.restore(str(run / "1")) == {"meta": {"a": None, "b": {}, "c": []}}


def test_restore_options_and_casts(tmp_path):
    tree = {"params": {"enc": {"k": jnp.arange(12.0).reshape(3, 4)}, "head": jnp.ones(10)}}
    path = _save(tmp_path / "ckpt", tree)
    enc = jc.restore(path, {"k": jnp.zeros((3, 4), jnp.bfloat16)}, prefix="params/enc")
    assert enc["k"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(enc["k"].astype(np.float32), np.arange(12.0).reshape(3, 4))
    part = jc.restore(path, {"encoder": {"k": jnp.zeros((3, 4))}}, partial=True,
                      prefix="params", rename={"^encoder/": "enc/"})  # fmt: skip
    np.testing.assert_array_equal(part["encoder"]["k"], np.arange(12.0).reshape(3, 4))
    status = jc.match(path, {"params": {"enc": {"k": jnp.zeros((3, 4))}, "x": jnp.zeros(1)}})
    assert status.missing == ["params/x"] and status.unused == ["params/head"]
    with pytest.raises(jc.StructureMismatchError, match="params/head"):
        jc.restore(path, {"params": {"enc": {"k": jnp.zeros((3, 4))}}})


def test_mesh_restore_reads_only_each_devices_slices(tmp_path, monkeypatch):
    x = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    path = _save(tmp_path / "ckpt", {"x": x})
    mesh = jax.make_mesh((8,), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    asked = []
    read_many = orbax_reader.OrbaxSource.read_many

    def spy(self, requests):
        asked.extend(i for _, i in requests)
        return read_many(self, requests)

    monkeypatch.setattr(orbax_reader.OrbaxSource, "read_many", spy)
    got = jc.restore(path, {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)})
    assert got["x"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(got["x"]), x)
    assert len(asked) == 8 and all(i is not None and i[0].stop - i[0].start == 8 for i in asked)


def test_manager_runs_steps_items_and_names(tmp_path):
    run = tmp_path / "run"
    opts = ocp.CheckpointManagerOptions(step_prefix="checkpoint")
    with ocp.CheckpointManager(run, options=opts) as mgr:
        for step in (3, 7):
            mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"w": jnp.full(4, step, jnp.float32)}),
                meta=ocp.args.JsonSave({"lr": 0.1, "tags": ["a", "b"]}),
            ), metrics={"loss": 1.0 / step})  # fmt: skip
        mgr.wait_until_finished()
    step7 = str(run / "checkpoint_7")
    got = jc.restore(step7)
    np.testing.assert_array_equal(got["state"]["w"], np.full(4, 7, np.float32))
    assert got["meta"] == {"lr": 0.1, "tags": ["a", "b"]}
    assert jc.open(step7).step == 7 and jc.open(f"{step7}/state").step == 7
    assert jc.restore(f"{step7}/state", {"w": jnp.zeros(4)})["w"][0] == 7
    # A single item, saved under plain step numbers: the item is the whole tree.
    with ocp.CheckpointManager(tmp_path / "plain") as mgr:
        mgr.save(5, args=ocp.args.StandardSave({"w": jnp.ones(2)}))
        mgr.wait_until_finished()
    assert jc.list_variables(str(tmp_path / "plain" / "5")) == [("w", (2,), "float32")]


def test_jaxckpt_manager_continues_an_orbax_run(tmp_path, capsys):
    run = tmp_path / "run"
    with ocp.CheckpointManager(run) as mgr:
        for step in (1, 2):
            mgr.save(step, args=ocp.args.StandardSave({"w": jnp.full(2, step, jnp.float32)}))
        mgr.wait_until_finished()
    with pytest.raises(
        jc.CheckpointNotFoundError,
        match=r"is the directory of an Orbax run \(2 steps, the newest .*/2\), not one checkpoint. Fix: restore one step",
    ):
        jc.restore(str(run))
    with jc.CheckpointManager(run, max_to_keep=1, async_save=False) as m:
        assert m.steps == [1, 2] and m.latest_step == 2
        np.testing.assert_array_equal(m.restore({"w": jnp.zeros(2)})["w"], [2.0, 2.0])
        np.testing.assert_array_equal(m.restore(1)["w"], [1.0, 1.0])
        for step in (3, 4):
            m.save(step, {"w": jnp.full(2, step, jnp.float32)})
        assert m.steps == [1, 2, 4]  # retention counts only its own steps
    assert sorted(n for n in os.listdir(run) if not n.startswith((".", "checkpoint"))) == [
        "1", "2", "ckpt-4"]  # fmt: skip
    assert os.listdir(run / "1") == os.listdir(run / "2")  # untouched
    assert cli.main(["ls", str(run)]) == 0
    out = capsys.readouterr().out
    assert "1 (Orbax)" in out and "2 (Orbax)" in out and "ckpt-4" in out


def test_latest_checkpoint_counts_orbax_steps(tmp_path):
    """Found only ckpt-<step>: now the newest step of either kind, as a manager lists them."""
    run = tmp_path / "run"
    opts = ocp.CheckpointManagerOptions(step_prefix="checkpoint")
    with ocp.CheckpointManager(run, options=opts) as mgr:
        for step in (1, 5):
            mgr.save(step, args=ocp.args.StandardSave({"w": jnp.full(2, step, jnp.float32)}))
        mgr.wait_until_finished()
    latest = jc.latest_checkpoint(run)
    assert latest == str(run / "checkpoint_5")
    np.testing.assert_array_equal(jc.restore(latest)["w"], [5.0, 5.0])
    jc.save(run / "ckpt-3", {"w": jnp.zeros(2)})
    assert jc.latest_checkpoint(run) == str(run / "checkpoint_5")
    jc.save(run / "ckpt-5", {"w": jnp.zeros(2)})  # a step of both kinds: jaxckpt's own
    assert jc.latest_checkpoint(run) == str(run / "ckpt-5")
    jc.save(run / "ckpt-9", {"w": jnp.zeros(2)})
    assert jc.latest_checkpoint(str(run)) == str(run / "ckpt-9")
    assert jc.latest_checkpoint(tmp_path / "absent") is None


def test_nnx_sequential_restores_into_its_state(tmp_path):
    def model(seed):
        return nnx.Sequential(
            nnx.Linear(2, 3, rngs=nnx.Rngs(seed)),
            nnx.Dropout(0.5, rngs=nnx.Rngs(seed + 1)),
            nnx.Linear(3, 1, rngs=nnx.Rngs(seed)),
        )

    saved = nnx.state(model(0))
    path = str(tmp_path / "nnx")
    with ocp.StandardCheckpointer() as ck:
        ck.save(path, saved)
    fresh = model(5)
    state = nnx.state(fresh)
    assert jc.match(path, state).assert_consumed()
    got = jc.restore(path, state)
    nnx.update(fresh, got)
    jax.tree_util.tree_map(_same, jax.tree_util.tree_leaves(nnx.state(fresh)),
                           jax.tree_util.tree_leaves(saved))  # fmt: skip


def test_cli_reads_orbax(tmp_path, capsys):
    a = _save(tmp_path / "a", {"w": jnp.ones(3)})
    b = _save(tmp_path / "b", {"w": jnp.ones(3)}, ocdbt=False)
    assert cli.main(["inspect", a]) == 0
    out = capsys.readouterr().out
    assert "(Orbax)" in out and "w" in out and "float32" in out
    assert cli.main(["diff", a, b]) == 0
    assert cli.main(["verify", "-q", a]) == 0
    assert "every array read and decoded (Orbax checkpoints hold no checksums" in (
        capsys.readouterr().out
    )
    assert cli.main(["graph", a, "-o", str(tmp_path / "g.svg")]) == 0
    # A damaged chunk is found by verify.
    chunk = next(
        p for p in (tmp_path / "b" / "w").rglob("*") if p.is_file() and "zarr" not in p.name
    )
    chunk.write_bytes(b"garbage")
    capsys.readouterr()
    assert cli.main(["verify", "-q", b]) == 1
    assert "DAMAGED w" in capsys.readouterr().out


def test_s3_orbax_checkpoint(tmp_path, s3_env):
    import tensorstore as ts

    local = _save(tmp_path / "ckpt", {"w": jnp.arange(5.0), "k": jax.random.key(1)})
    url = f"s3://{S3_BUCKET}/orbax-{tmp_path.name}"
    jc.set_storage_options("s3", endpoint=s3_env.url, aws_region="us-east-1")
    from jaxckpt import storage

    kv = ts.KvStore.open(storage.at(url).kvstore_spec()).result()
    for root, _, files in os.walk(local):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                kv.write(os.path.relpath(full, local), fh.read()).result()
    got = jc.restore(url)
    np.testing.assert_array_equal(got["w"], np.arange(5.0))
    _same(got["k"], jax.random.key(1))
    part = jc.restore(url, {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}, partial=True)
    np.testing.assert_array_equal(part["w"], np.arange(5.0))


S3_BUCKET = "jaxckpt-orbax"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    import servers

    srv = servers.start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    servers.create_s3_bucket(srv.url, S3_BUCKET)
    yield srv
    srv.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    import servers

    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    for k, v in servers.DUMMY_AWS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
    yield s3_server
    jc.set_storage_options("s3")
