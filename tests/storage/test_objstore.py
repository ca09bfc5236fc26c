"""One storage conformance suite over a local directory, S3 (moto) and GCS (fake-gcs-server).

The servers are real processes on 127.0.0.1, started once per test session (per xdist worker)
by the fixtures below; every test writes under its own fresh prefix.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import servers

import jaxckpt as jc
from jaxckpt import storage as _storage
from jaxckpt.tools import cli as cli

BUCKET = servers.BUCKET
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3", "gcs"])
def base(request, tmp_path):
    """A fresh, empty location of each kind: the directory a run's checkpoints go in."""
    run = uuid.uuid4().hex[:10]
    if request.param == "local":
        return str(tmp_path / run)
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return f"s3://{BUCKET}/{run}"
    request.getfixturevalue("gcs_env")
    return f"gs://{BUCKET}/{run}"


def model_state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)  # NumPy: no jit compile before the first test
    params = {
        "l1": {
            "kernel": jnp.asarray(rng.standard_normal((4, 5), np.float32)),
            "bias": jnp.arange(5, dtype=jnp.float32) + seed,
        },
        "emb": jnp.asarray(rng.standard_normal((7, 3), np.float32)).astype(jnp.bfloat16),
        "ids": jnp.arange(-4, 4, dtype=jnp.int8),
    }
    opt = optax.adam(0.1).init(params)
    return {"params": params, "opt_state": opt, "step": 7, "mask": np.array([True, False])}


def assert_trees_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def keys_of(root: str) -> list[str]:
    return sorted(k.decode() for k in _storage.at(root).open_kv().list().result())


class TestStorage:
    """The same behaviour on every kind of location."""

    def test_round_trip(self, base):
        tree = model_state()
        path = jc.save(_storage.join(base, "ckpt-7"), tree, step=7)
        assert path == _storage.normalize(_storage.join(base, "ckpt-7"))
        assert_trees_equal(jc.restore(path, tree), tree)
        raw = jc.restore(path)  # no target: dicts of NumPy arrays
        np.testing.assert_array_equal(raw["params"]["emb"], np.asarray(tree["params"]["emb"]))
        assert ("params/l1/kernel", (4, 5), "float32") in jc.list_variables(path)
        keys = keys_of(path)
        assert "COMMIT" in keys and "zarr.json" in keys and "params/l1/zarr.json" in keys
        assert _storage.PENDING not in keys

    def test_partial_restore_and_match(self, base):
        tree = model_state()
        path = jc.save(_storage.join(base, "ckpt"), tree)
        small = {"params": {"l1": {"bias": jnp.zeros(5, jnp.float32)}}}
        got = jc.restore(path, small, partial=True)
        assert_trees_equal(got, {"params": {"l1": {"bias": tree["params"]["l1"]["bias"]}}})
        status = jc.match(path, small)
        status.assert_existing_objects_matched()
        with pytest.raises(jc.StructureMismatchError, match="params/l1/kernel"):
            status.assert_consumed()

    def test_lazy_reads(self, base):
        tree = model_state()
        path = jc.save(_storage.join(base, "ckpt"), tree)
        reader = jc.open(path)
        assert "params/l1/kernel" in reader.paths
        kernel = np.asarray(tree["params"]["l1"]["kernel"])
        np.testing.assert_array_equal(reader["params/l1/kernel"], kernel)
        np.testing.assert_array_equal(
            reader.read("params/l1/kernel", (slice(1, 3), 2)), kernel[1:3, 2]
        )
        assert reader["step"] == 7

    def test_never_overwrites_a_checkpoint(self, base):
        tree = model_state()
        path = jc.save(_storage.join(base, "ckpt"), tree)
        with pytest.raises(jc.CheckpointExistsError, match="never overwrites"):
            jc.save(path, model_state(seed=1))
        assert_trees_equal(jc.restore(path, tree), tree)

    def test_uncommitted_location_is_no_checkpoint(self, base):
        path = _storage.normalize(_storage.join(base, "half"))
        _storage.at(path).begin().release()
        _storage.at(path).write_durable("zarr.json", b"{}")
        with pytest.raises(jc.CheckpointNotFoundError, match="holds no committed checkpoint"):
            jc.restore(path)
        with pytest.raises(jc.CheckpointNotFoundError, match="No checkpoint at"):
            jc.open(_storage.join(base, "absent"))

    def test_foreign_content_is_left_alone(self, base):
        path = _storage.normalize(_storage.join(base, "data"))
        if _storage.at(path).os_path() is not None:
            os.makedirs(path)
        _storage.at(path).write_durable("mine.txt", b"user data")
        with pytest.raises(
            jc.CheckpointExistsError, match="is neither an empty directory nor a checkpoint"
        ):
            jc.save(path, {"w": np.ones(2)})
        assert keys_of(path) == ["mine.txt"]

    def test_corruption_is_detected(self, base):
        # w (over 1 MiB) has its own chunk; v may share a packed one with other small leaves
        tree = {"w": np.arange(300_000, dtype=np.float32), "v": np.ones(3, np.int32)}
        path = jc.save(_storage.join(base, "ckpt"), tree)
        reader = jc.open(path)
        kv = _storage.at(path).open_kv()
        w_chunk = reader.record("w")["loc"] + "/c/0"
        good = kv.read(w_chunk).result().value
        bad = bytearray(good)
        bad[5] ^= 0xFF  # same length, one flipped byte: only the checksum can tell
        kv.write(w_chunk, bytes(bad)).result()
        with pytest.raises(jc.CorruptCheckpointError, match="Reading the array 'w' of .* failed"):
            jc.restore(path, tree)
        np.testing.assert_array_equal(jc.open(path)["v"], tree["v"])  # the rest still reads
        kv.write(reader.record("v")["loc"] + "/c/0", None).result()  # missing: damage, not zeros
        with pytest.raises(jc.CorruptCheckpointError, match="'v'.*missing"):
            jc.open(path)["v"]

    def test_damaged_metadata_and_pack_chunks_are_caught(self, base):
        """COMMIT's checksums are checked on every store; verify reads each pack chunk whole."""
        tree = {f"k{i}": np.arange(3, dtype=np.float32) + i for i in range(64)}  # one pack
        path = jc.save(_storage.join(base, "ckpt"), tree)
        kv = _storage.at(path).open_kv()
        pack = "~pack/0/zarr.json"
        good = kv.read(pack).result().value
        kv.write(pack, good.replace(b'"fill_value":0', b'"fill_value":1')).result()
        where = f"{_storage.normalize(path)}/{pack}"
        with pytest.raises(jc.CorruptCheckpointError, match=re.escape(f"{where} is damaged")):
            jc.restore(path)  # read, and checked, before the pack's leaves are read
        out = io.StringIO()
        assert cli.main(["verify", "-q", path], out) == 1
        assert f"DAMAGED {where} is damaged: it fails the crc32c checksum" in out.getvalue()
        kv.write(pack, good).result()
        chunk = kv.read("~pack/0/c/0").result().value
        kv.write("~pack/0/c/0", chunk[:-100] + b"\1" + chunk[-99:]).result()  # after the leaves
        if _storage.at(path).os_path() is None:  # leaves are read from whole chunks, each checked
            with pytest.raises(jc.CorruptCheckpointError, match=r"~pack/0/c/0\"?: Digest mismatch"):
                jc.open(path).tree()
        else:  # a few leaves, each read alone and checked against its own checksum
            assert_trees_equal(jc.open(path).tree(), tree)
        out = io.StringIO()
        assert cli.main(["verify", "-q", path], out) == 1
        assert "~pack/0/c/0" in out.getvalue()

    def test_split_structure_record(self, base):
        """A big tree's record is split over its groups' zarr.json, read lazily (format.md)."""
        tree = {f"b{i}": {f"w{k}": np.full(2, 100 * i + k, np.int32) for k in range(100)}
                for i in range(20)}  # fmt: skip
        path = jc.save(_storage.join(base, "ckpt"), tree)
        assert (
            '"split":true' in _storage.at(path).open_kv().read("zarr.json").result().value.decode()
        )
        assert_trees_equal(jc.restore(path), tree)  # every group file, read together
        _storage.at(path).open_kv().write("b3/zarr.json", None).result()
        got = jc.restore(path, {"b4": {"w7": np.zeros(2, np.int32)}}, partial=True)
        np.testing.assert_array_equal(got["b4"]["w7"], [407, 407])
        with pytest.raises(jc.CorruptCheckpointError, match=r"b3/zarr.json is missing: .*\['b3'\]"):
            jc.restore(path)

    def test_manager_rotation_index_and_best(self, base):
        """max_to_keep, the index, best_metric, latest_checkpoint and async saves."""
        trees = {step: model_state(seed=step) for step in range(1, 6)}
        losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0}
        with jc.CheckpointManager(base, max_to_keep=2, best_metric="loss") as mngr:
            for step, tree in trees.items():
                assert mngr.save(step, tree, metrics={"loss": losses[step]})
            mngr.wait_until_finished()
            assert mngr.steps == [2, 5]  # the two best, the newest among them
            assert mngr.best_step == 2
        names = _storage.at(_storage.normalize(base)).names()
        names = [n for n in names if n != ".jaxckpt-writer"]  # a local run's writer lock
        assert names == ["checkpoint", "ckpt-2", "ckpt-5"]  # rotation deleted by prefix
        index = json.loads(_storage.at(_storage.normalize(base)).read("checkpoint"))
        assert [(c["step"], c["metrics"]) for c in index["checkpoints"]] == [
            (2, {"loss": 1.0}),
            (5, {"loss": 2.0}),
        ]
        assert jc.latest_checkpoint(base) == _storage.join(base, "ckpt-5")
        again = jc.CheckpointManager(base, max_to_keep=2, best_metric="loss")
        assert again.steps == [2, 5] and again.best_step == 2
        assert_trees_equal(again.restore(target=model_state()), trees[5])
        assert_trees_equal(again.restore(2, target=model_state()), trees[2])
        again.close()

    def test_command_line(self, base):
        """``jaxckpt ls / inspect / verify / diff`` on the location."""
        with jc.CheckpointManager(base, async_save=False) as mngr:
            mngr.save(1, {"w": np.ones(3, np.float32)}, metrics={"loss": 0.5})
            mngr.save(2, {"w": np.zeros(3, np.float32)})
        one, two = (_storage.join(base, f"ckpt-{s}") for s in (1, 2))
        out = io.StringIO()
        assert cli.main(["ls", base], out) == 0
        assert re.search(r"1\s+ckpt-1\s+[\d.]+ \w*B .*loss=0.5", out.getvalue())
        assert "2 checkpoints" in out.getvalue()
        assert cli.main(["inspect", one], out) == 0
        assert re.search(r"w\s+\(3,\)\s+float32", out.getvalue())
        assert cli.main(["verify", one], out) == 0
        assert f"OK: {_storage.normalize(one)}" in out.getvalue()
        assert cli.main(["diff", one, two], out) == 1
        assert "differ" in out.getvalue()

    def test_interrupted_save(self, base):
        """A save process killed mid-write commits nothing and spoils no earlier checkpoint."""
        first = jc.save(_storage.join(base, "ckpt-1"), model_state())
        second = _storage.normalize(_storage.join(base, "ckpt-2"))
        _kill_mid_save(second)
        assert_trees_equal(jc.restore(first, model_state()), model_state())
        with pytest.raises(jc.CheckpointNotFoundError):
            jc.restore(second)
        assert jc.latest_checkpoint(base) == _storage.join(base, "ckpt-1")
        # A manager started on the directory removes the debris, and saves that step anew.
        with jc.CheckpointManager(base, max_to_keep=3) as mngr:
            assert mngr.steps == [1]
            names = _storage.at(_storage.normalize(base)).names()
            assert [n for n in names if n != "checkpoint"] == ["ckpt-1"]
            tree = model_state(seed=2)
            mngr.save(2, tree)
        assert_trees_equal(jc.restore(second, tree), tree)
        assert all(not k.startswith("x") for k in keys_of(second))  # none of the killed save's

    def test_save_over_debris(self, base):
        """A plain save to where a killed save left debris clears it first."""
        second = _storage.normalize(_storage.join(base, "ckpt-2"))
        tmp = _storage.at(second).temporary().root  # the final prefix itself on an object store
        _storage.at(tmp).begin().release()  # what a save does first, before writing its arrays
        _storage.at(tmp).write_durable("x0001.json", b"{}")
        if (
            _storage.at(tmp).os_path() is None
        ):  # the save's writer is gone: a process that has ended
            _storage.at(tmp).write_durable(_storage.PENDING, _dead_owner())
        tree = model_state(seed=2)
        assert jc.save(second, tree) == second
        assert_trees_equal(jc.restore(second, tree), tree)
        assert "x0001.json" not in keys_of(second) and _storage.PENDING not in keys_of(second)

    def test_a_save_in_progress_is_not_debris(self, base):
        """A manager that starts while a save writes (of this process or another) leaves the
        save alone; once its writer is gone, the next manager removes what it left."""
        run = _storage.normalize(base)
        jc.save(_storage.join(run, "ckpt-1"), model_state())
        final = _storage.join(run, "ckpt-2")
        tmp = _storage.at(final).temporary().root
        lock = _storage.at(tmp).begin()
        _storage.at(tmp).write_durable("x0001.json", b"{}")
        if (
            _storage.at(final).os_path() is None
        ):  # a save to the same prefix is refused (locally each save
            with pytest.raises(jc.CheckpointExistsError):  # has a temporary sibling of its own)
                jc.save(final, model_state())
        assert jc.CheckpointManager(base).steps == [1]
        assert "x0001.json" in keys_of(tmp)  # left alone
        lock.release()
        if _storage.at(tmp).os_path() is None:
            _storage.at(tmp).write_durable(_storage.PENDING, _dead_owner())
        assert jc.CheckpointManager(base).steps == [1]
        assert not _storage.at(tmp).is_dir()


def _dead_owner() -> bytes:
    """A ``PENDING`` naming a process of this host that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.dumps({"host": socket.gethostname(), "pid": int(proc.stdout), "time": 0}).encode()


_CHILD = """
import sys, numpy as np, jaxckpt as jc
tree = {f"x{i:04d}": np.full((256,), i, np.float32) for i in range(%d)}
jc.save(sys.argv[1], tree)
"""


def _debris(final: str) -> bool:
    """Whether the save has begun writing arrays (it commits only after writing them all)."""
    if _storage.at(final).os_path() is None:
        return len(set(keys_of(final)) - {_storage.PENDING}) > 0
    parent, name = os.path.split(final)
    return any(_holds_files(tmp) for tmp in Path(parent).glob(name + _storage.TMP_MARK + "*"))


def _holds_files(tmp: Path) -> bool:
    try:
        return any(tmp.iterdir())
    except FileNotFoundError:  # committed (renamed) meanwhile
        return False


def _kill_mid_save(final: str) -> None:
    """Starts a save of many arrays in a child process and SIGKILLs it once arrays land."""
    arrays = (
        300 if (_storage.at(final).os_path() is None) else 1000
    )  # a slower store needs fewer to be slow
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD % arrays), final], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _debris(final):
            assert child.poll() is None, (
                f"the save finished before it was killed: {child.stderr.read()!r}"
            )
            assert time.monotonic() < deadline, "the child save never started writing"
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not _storage.at(final).is_committed()


# ---------------------------------------------------------------------------- configuration


def _round_trip(path: str) -> None:
    tree = model_state()
    assert_trees_equal(jc.restore(jc.save(path, tree), tree), tree)


def test_s3_endpoint_conventions(s3_env, monkeypatch):
    """``AWS_ENDPOINT_URL_S3`` wins over ``AWS_ENDPOINT_URL``, which serves when alone."""
    dead = f"http://127.0.0.1:{servers.free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    _round_trip(f"s3://{BUCKET}/{uuid.uuid4().hex}/a")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.url)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    spec = _storage.at(f"s3://{BUCKET}/run/ckpt-1").kvstore_spec()
    assert spec == {
        "driver": "s3", "bucket": BUCKET, "path": "run/ckpt-1/", "endpoint": s3_env.url,
        "aws_region": "eu-west-3", "aws_credentials": {"type": "environment"},
        "s3_request_retries": {"max_retries": 6, "initial_delay": "1s", "max_delay": "16s"},
    }  # fmt: skip
    _round_trip(f"s3://{BUCKET}/{uuid.uuid4().hex}/b")


def test_s3_explicit_options(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    jc.set_storage_options("s3", endpoint=s3_env.url, aws_region="us-east-1")
    _round_trip(f"s3://{BUCKET}/{uuid.uuid4().hex}/ckpt")
    with pytest.raises(ValueError, match=r"scheme must be one of \['gs', 's3'\], got 'gcs'"):
        jc.set_storage_options("gcs", endpoint="x")


def test_gcs_storage_emulator_host(gcs_env, monkeypatch):
    """``STORAGE_EMULATOR_HOST`` (host:port, as google-cloud-storage reads it) is enough."""
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_env.url.removeprefix("http://"))
    _round_trip(f"gs://{BUCKET}/{uuid.uuid4().hex}/ckpt")
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs_env.url


def test_unknown_scheme_and_missing_bucket_name():
    with pytest.raises(ValueError, match="uses the scheme 'hdfs'; jaxckpt reads and writes"):
        jc.save("hdfs://cluster/ckpt", {"w": np.ones(2)})
    with pytest.raises(ValueError, match=r"names no bucket. Fix: write s3://BUCKET/PREFIX"):
        jc.restore("s3:///")


# ---------------------------------------------------------------------------- errors


@pytest.fixture(params=["s3", "gcs"])
def proxied(request, monkeypatch):
    """Points s3:// or gs:// at a FaultyProxy in front of the real server; yields (proxy, base).

    The retry delays are cut to milliseconds (TensorStore's defaults start at 1 s).
    """
    faults: list = []
    if request.param == "s3":
        srv = request.getfixturevalue("s3_env")
        proxy = servers.FaultyProxy(srv.url, lambda *a: faults[0](*a) if faults else None)
        jc.set_storage_options("s3", endpoint=proxy.url, s3_request_retries=FAST_RETRIES)
        base = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    else:
        srv = request.getfixturevalue("gcs_env")
        proxy = servers.FaultyProxy(srv.url, lambda *a: faults[0](*a) if faults else None)
        monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)
        jc.set_storage_options("gs", gcs_request_retries=FAST_RETRIES)
        base = f"gs://{BUCKET}/{uuid.uuid4().hex}"
    yield proxy, base, faults
    proxy.stop()


FAST_RETRIES = {"max_retries": 6, "initial_delay": "1ms", "max_delay": "20ms"}


def test_transient_errors_are_retried(proxied):
    proxy, base, faults = proxied
    first_tries: set[tuple[str, str]] = set()

    def every_request_fails_once(method: str, path: str, n: int) -> int | None:
        path = re.sub(r"[?&]tensorstore=\w+", "", path)  # the gcs driver's cache buster
        if (method, path) in first_tries:
            return None
        first_tries.add((method, path))
        return 503 if n % 2 else 429  # unavailable, throttled

    faults.append(every_request_fails_once)
    _round_trip(_storage.join(base, "ckpt"))
    assert {s for _, _, s in proxy.failed} == {503, 429}
    assert len(proxy.failed) == len(first_tries) > 10


def test_permanent_error_names_url_and_array(proxied):
    proxy, base, faults = proxied
    tree = {"w": np.arange(300_000, dtype=np.float32), "v": np.ones(2, np.float32)}  # w: own path
    path = jc.save(_storage.join(base, "ckpt"), tree)
    faults.append(lambda method, path, n: 403 if method == "GET" and "/w/c/" in path else None)
    with pytest.raises(
        jc.CheckpointError, match=rf"Accessing {path} \(the array 'w'\) failed: .*403"
    ):
        jc.restore(path, tree)
    faults[0] = lambda method, path, n: 403 if method in ("PUT", "POST") and "/w/" in path else None
    with pytest.raises(
        jc.CheckpointError, match=rf"Accessing {base}/ckpt-2 \(the array 'w'\) failed"
    ):
        jc.save(_storage.join(base, "ckpt-2"), tree)
    with pytest.raises(jc.CheckpointNotFoundError, match="No checkpoint at"):
        jc.restore(_storage.join(base, "ckpt-2"))  # the failed save removed what it wrote


def test_missing_bucket(s3_env):
    with pytest.raises(jc.CheckpointNotFoundError, match="Accessing s3://no-such-bucket/c failed"):
        jc.restore("s3://no-such-bucket/c")
    with pytest.raises(jc.CheckpointError, match=r"check the bucket name, the endpoint \(AWS_"):
        jc.save("s3://no-such-bucket/c", {"w": np.ones(2)})


def test_missing_gcs_bucket(gcs_env):
    with pytest.raises(jc.CheckpointError, match="application default credentials"):
        jc.save("gs://no-such-bucket/c", {"w": np.ones(2)})


def test_local_write_error_names_path_and_array(tmp_path):
    """A write the disk refuses (here: past RLIMIT_FSIZE, EFBIG) names the path and the array."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(jc.CheckpointError) as e:
            jc.save(tmp_path / "c", {"w": np.ones(300_000)})  # 2.4 MB: its own path, not packed
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    # The checkpoint's own path, not the temporary directory the save was writing.
    assert str(e.value) == (
        f"Writing {tmp_path}/c (the array 'w') failed: File too large. Fix: check the free "
        f"space and the permissions of {tmp_path}."
    )
    assert isinstance(e.value, OSError) and e.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []  # the failed save removed what it wrote


def test_zero_chunks_in_a_bucket(s3_env, tmp_path, monkeypatch):
    """A save to a bucket writes every chunk, zeros included; a local checkpoint (whose zero
    chunks were left out) copied to a bucket reads the same; an unlisted missing chunk is damage."""
    run = f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}"
    tree = model_state()  # Adam's slots are zeros
    saved = jc.save(f"{run}/saved", tree)
    assert "opt_state/0/mu/l1/kernel/c/0/0" in keys_of(saved)
    assert all("zero_chunks" not in r for r in jc.open(saved).records.values())

    monkeypatch.setattr(_storage.arrays, "CHUNK_BYTES", 4096)  # 1024 float32 rows per chunk
    x = np.zeros((8, 1024), np.float32)
    x[5] = np.arange(1024)
    local = jc.save(tmp_path / "ckpt", {"x": x, "z": np.zeros(3, np.int8), "one": np.ones(2)})
    assert jc.open(local).record("x")["zero_chunks"] == [0, 1, 2, 3, 4, 6, 7]
    copied = f"{run}/copied"
    kv = _storage.at(copied).open_kv()
    for d, _, names in os.walk(local):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                kv.write(os.path.relpath(os.path.join(d, n), local), f.read()).result()
    want = {"x": x, "z": np.zeros(3, np.int8), "one": np.ones(2)}
    assert_trees_equal(jc.restore(copied), want)
    np.testing.assert_array_equal(jc.open(copied).read("x", (slice(4, 7),)), x[4:7])
    kv.write("x/c/5/0", None).result()
    with pytest.raises(jc.CorruptCheckpointError, match="'x'.*x/c/5/0 is missing"):
        jc.restore(copied)


def test_progress_on_an_object_store(gcs_env, monkeypatch):
    """jc.set_progress: TensorStore's writes and reads count too (see test_progress.py)."""
    from jaxckpt import progress as _progress

    monkeypatch.setattr(_progress, "_settings", dict(_progress._settings))
    stream = io.StringIO()
    jc.set_progress(True, stream=stream)
    path = f"gs://{BUCKET}/{uuid.uuid4().hex[:10]}/ckpt-1"
    state = {"w": np.ones((64, 64), np.float32), "step": 1}
    jc.save(path, state)
    assert_trees_equal(jc.restore(path, state), state)
    full = "[##############################] 100.0%  16.0 KiB of 16.0 KiB"
    assert stream.getvalue().splitlines() == [f"save {path}: {full}", f"restore {path}: {full}"]
