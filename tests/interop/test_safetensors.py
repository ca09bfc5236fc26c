"""safetensors: files written by the library itself, read bit for bit; files written by jaxckpt,
read by the library bit for bit; damaged headers named; byte-range reads."""

from __future__ import annotations

import json
import os
import uuid

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy as stn
import servers
from flax import serialization

import jaxckpt as jc
from jaxckpt import storage
from jaxckpt.interop import safetensors as st
from jaxckpt.interop import safetensors_write as stw
from jaxckpt.tools.cli import main

DTYPES = [
    np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
    np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.complex64, ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz,
    ml_dtypes.float8_e8m0fnu,
]  # fmt: skip


def every_dtype() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i, t in enumerate(DTYPES):
        raw = rng.integers(0, 256, (3, 2 + i % 3) if i % 2 else (5,), np.uint8)
        raw = np.repeat(raw, np.dtype(t).itemsize, axis=-1)
        out[f"model.t{i:02d}"] = raw.view(t) if t is not np.bool_ else raw.astype(bool)
    out["model.special"] = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-40], np.float32)
    out["model.bf16"] = np.array([np.nan, -0.0, 3.5, -np.inf], ml_dtypes.bfloat16)
    out["scalar"] = np.array(7, np.int32)
    out["empty"] = np.zeros((0, 4), np.float32)
    return out


def same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


def test_reads_what_the_library_writes_bit_for_bit(tmp_path):
    tensors = every_dtype()
    path = tmp_path / "model.safetensors"
    stn.save_file(tensors, str(path), metadata={"format": "np"})
    assert st.recognise(path) and st.recognise(tmp_path)
    with st.open(path) as src:
        assert src.format == "safetensors" and src.step is None
        assert src.metadata == {"format": "np"}
        assert set(src.leaves()) == {tuple(k.split(".")) for k in tensors}
        for keys, leaf in src.leaves().items():
            want = tensors[".".join(keys)]
            assert leaf.shape == want.shape and leaf.dtype == want.dtype
            same_bits(src.read(keys), want)
    with st.open(tmp_path, split=False) as src:  # a directory holding model.safetensors
        assert set(src.leaves()) == {(k,) for k in tensors}
        same_bits(src.read(("model.bf16",)), tensors["model.bf16"])


def test_reads_safetensors_flax_files(tmp_path):
    tensors = {
        "bert.encoder.layer.0.attention.self.query.kernel": jnp.arange(12.0).reshape(3, 4),
        "bert.encoder.layer.0.attention.self.query.bias": jnp.array([-0.0, jnp.nan, 1, 2]),
        "bert.embeddings.word": jnp.ones((5, 3), jnp.bfloat16),
    }
    path = str(tmp_path / "flax.safetensors")
    safetensors.flax.save_file(tensors, path)
    with st.open(path) as src:
        keys = ("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel")
        assert keys in src.leaves()  # digits stay str keys
        for name, want in tensors.items():
            same_bits(src.read(tuple(name.split("."))), np.asarray(want))


def test_slices_read_only_their_rows(tmp_path, monkeypatch):
    big = np.arange(1000 * 64, dtype=np.float32).reshape(1000, 64)
    path = str(tmp_path / "m.safetensors")
    stn.save_file({"big": big, "small": np.ones(3, np.float32)}, path)
    src = st.open(path)
    seen = []
    real = os.preadv

    def counted(fd, buffers, offset):
        seen.append(sum(len(b) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(st.os, "preadv", counted)
    for index in [
        (slice(10, 20),),
        (slice(10, 20), slice(3, 9)),
        (slice(5, 50, 7),),
        (slice(40, 3, -3), slice(None, None, 2)),
        (slice(30, 30),),
    ]:
        seen.clear()
        got = src.read(("big",), index)
        np.testing.assert_array_equal(got, big[index])
        rows = range(*index[0].indices(1000))
        assert sum(seen) == (max(rows) - min(rows) + 1 if rows else 0) * 64 * 4
    seen.clear()
    same_bits(src.read(("small",)), np.ones(3, np.float32))
    assert seen == [12]  # one tensor: its bytes only
    src.close()


def test_slices_of_later_axes_read_only_their_bytes(tmp_path, monkeypatch):
    """A slice of a later axis (what a process of a restore sharded on columns needs) reads
    runs of just its bytes where they are long enough; short runs widen to whole rows."""
    wide = np.arange(6 * 4 * 2048, dtype=np.float32).reshape(6, 4, 2048)
    path = str(tmp_path / "m.safetensors")
    stn.save_file({"wide": wide}, path)
    src = st.open(path)
    seen = []
    real = os.preadv

    def counted(fd, buffers, offset):
        seen.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(st.os, "preadv", counted)
    for index, nbytes in [
        ((slice(None), slice(None), slice(1024, 2048)), 6 * 4 * 1024 * 4),  # 4 KiB runs
        ((slice(1, 3), slice(1, 3), slice(0, 1024)), 2 * 2 * 1024 * 4),
        ((slice(0, 6, 5), 2), 6 * 2048 * 4),  # an int index; the rows between steps are read
        ((slice(2, 4), slice(None), slice(0, 8)), 2 * 4 * 2048 * 4),  # 32-byte runs: rows
        ((-1, slice(3, 4), slice(5, 6)), 2048 * 4),  # a 4-byte run widened to its row
    ]:
        seen.clear()
        got = src.read(("wide",), index)
        np.testing.assert_array_equal(got, wide[index])
        assert sum(n for _, n in seen) == nbytes
    assert all(n >= st.MIN_RUN for _, n in seen)
    src.close()


def test_whole_tensors_are_read_into_aligned_buffers(tmp_path):
    """XLA's CPU client adopts a 64-byte aligned host buffer without copying it."""
    tensors = {f"t{i}": np.full((300 + i, 257), i, np.float32) for i in range(4)}
    path = str(tmp_path / "m.safetensors")
    stn.save_file(tensors, path)
    with st.open(path) as src:
        for name, want in tensors.items():
            got = src.read((name,))
            assert got.ctypes.data % 64 == 0
            same_bits(got, want)


def test_sharded_set_through_its_index(tmp_path):
    a = {"enc.w": np.arange(6, dtype=np.float32).reshape(2, 3), "enc.b": np.ones(3, np.float16)}
    b = {"head.w": np.full((3, 2), -0.0, np.float32)}
    stn.save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    stn.save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in b}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 42}, "weight_map": weight_map}))
    for path in (index, tmp_path):
        assert st.recognise(path)
        with st.open(path) as src:
            assert list(src.leaves()) == [("enc", "b"), ("enc", "w"), ("head", "w")]
            for name, want in (a | b).items():
                same_bits(src.read(tuple(name.split("."))), want)
    weight_map["enc.missing"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(jc.CorruptCheckpointError, match="'enc.missing' its index .* is not in it"):
        st.open(index)


def _raw(header: dict, data: bytes = b"", pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8 if pad else 0)
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4,
         "'w' has data_offsets \\[0, 8\\] outside the data section"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
         r"'w' \(F32\[3\]\) needs 12 bytes but data_offsets \[0, 8\] give 8"),
        ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
          "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6,
         "the tensors 'a' and 'b' overlap"),
        ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, b"\0",
         "'w' has the unknown dtype 'X9'"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4,
         "'w' has a malformed shape or data_offsets"),
    ],
)  # fmt: skip
def test_damaged_headers_name_the_file_and_tensor(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw(header, data))
    with pytest.raises(jc.CorruptCheckpointError, match=message) as e:
        st.open(path)
    assert str(e.value).startswith(f"The safetensors file {path} is damaged")
    assert str(e.value).endswith("Fix: download or write it again.")


def test_truncated_and_unreadable_files(tmp_path):
    good = stn.save({"w": np.arange(4, dtype=np.float32)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:20])
    with pytest.raises(jc.CorruptCheckpointError, match="header length .* does not fit"):
        st.open(cut)
    cut.write_bytes(good[:-4])
    with pytest.raises(jc.CorruptCheckpointError, match="outside the data section"):
        st.open(cut)
    notjson = tmp_path / "j.safetensors"
    notjson.write_bytes(_raw({}).replace(b"{}", b"{x"))
    assert st.recognise(notjson)  # looks like one by its first bytes ...
    with pytest.raises(jc.CorruptCheckpointError, match="its header is not JSON"):
        st.open(notjson)  # ... and its header says otherwise
    other = tmp_path / "weights.pt"
    other.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert not st.recognise(other) and not st.recognise(tmp_path / "absent.safetensors")


def test_names_that_do_not_split_into_a_tree(tmp_path):
    path = tmp_path / "m.safetensors"
    stn.save_file({"a": np.ones(1), "a.b": np.ones(1)}, str(path))
    with pytest.raises(jc.StructureMismatchError, match="'a' in .* is also the start of 'a.b'"):
        st.open(path)
    assert set(st.open(path, split=False).leaves()) == {("a",), ("a.b",)}
    stn.save_file({"a..b": np.ones(1)}, str(path))
    with pytest.raises(jc.StructureMismatchError, match="empty part between dots.*split=False"):
        st.open(path)


# ------------------------------------------------------------------------------ writing


def test_writes_the_librarys_own_bytes(tmp_path):
    tensors = every_dtype()
    items = [stw.Tensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    path = str(tmp_path / "mine.safetensors")
    stw.write_file(path, items)
    with open(path, "rb") as f:
        assert f.read() == stn.save(tensors)
    # safetensors.numpy 0.8 loads NumPy's own dtypes only (it has no code for bfloat16 or the
    # float8s): those are checked by the byte equality above.
    loadable = {k: v for k, v in tensors.items() if v.dtype.type.__module__ == "numpy"}
    path = str(tmp_path / "loadable.safetensors")
    stw.write_file(
        path, [stw.Tensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in loadable.items()]
    )
    loaded = stn.load_file(path)
    assert sorted(loaded) == sorted(loadable)
    for k, v in loadable.items():
        same_bits(loaded[k], v)


def test_shards_as_hugging_face_does(tmp_path):
    tensors = {f"layer.{i}.w": np.full((i + 1, 10), i, np.float32) for i in range(5)}
    tensors["huge"] = np.zeros(100, np.float64)  # 800 bytes: alone in its shard
    items = [stw.Tensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    # As huggingface_hub: a new shard when the next tensor would pass the size; a larger
    # tensor goes alone into a shard of its own at once.
    assert [[t.name for t in g] for g in stw.shards(items, 200)] == [
        ["layer.0.w", "layer.1.w"],
        ["layer.2.w"],
        ["layer.3.w"],
        ["huge"],
        ["layer.4.w"],
    ]
    dst = str(tmp_path / "model.safetensors")
    index = stw.write(dst, items, 200)
    assert index == str(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(dst)
    doc = json.loads(open(index).read())
    assert doc["metadata"] == {"total_size": sum(v.nbytes for v in tensors.values())}
    assert doc["weight_map"]["layer.0.w"] == "model-00001-of-00005.safetensors"
    assert doc["weight_map"]["huge"] == "model-00004-of-00005.safetensors"
    for name, file in doc["weight_map"].items():
        same_bits(stn.load_file(str(tmp_path / file))[name], tensors[name])
    assert stw.write(str(tmp_path / "one.safetensors"), items, 10**6).endswith("one.safetensors")


def test_parse_size():
    assert stw.parse_size("5GB") == 5 * 10**9 and stw.parse_size("2MiB") == 2 * 2**20
    assert stw.parse_size(1000) == 1000 and stw.parse_size("1.5kb") == 1500
    with pytest.raises(ValueError, match="max_shard_size must be a positive number of bytes"):
        stw.parse_size("lots")


def tree_with_key():
    return {
        "params": {
            "enc": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.zeros(3, jnp.float16)},
            "layers": [{"w": np.array([-0.0, np.nan], np.float32)}],
        },
        "rng": jax.random.key(3),
        "step": 5,
    }


def test_convert_jaxckpt_to_safetensors_and_back(tmp_path, capsys):
    tree = tree_with_key()
    del tree["rng"]
    ckpt = jc.save(tmp_path / "ckpt", tree)
    dst = tmp_path / "out" / "model.safetensors"
    dst.parent.mkdir()
    assert jc.convert(ckpt, dst) == str(dst)
    loaded = stn.load_file(str(dst))
    assert sorted(loaded) == ["params.enc.bias", "params.enc.kernel", "params.layers.0.w", "step"]
    same_bits(loaded["params.enc.bias"], np.zeros(3, np.float16))
    same_bits(loaded["params.layers.0.w"], np.array([-0.0, np.nan], np.float32))
    same_bits(loaded["step"], np.array(5))
    # ... and back into a jaxckpt checkpoint, which restores into the params.
    back = tmp_path / "back"
    assert main(["convert", str(dst), str(back)]) == 0
    out = capsys.readouterr().out
    assert (
        out == f"Converted the safetensors file {dst} (4 leaves) to the jaxckpt checkpoint {back}\n"
    )
    got = jc.restore(back, partial=True)
    same_bits(got["params"]["enc"]["kernel"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
    same_bits(got["params"]["layers"]["0"]["w"], np.array([-0.0, np.nan], np.float32))
    # Sharded, from the command line.
    sharded = tmp_path / "sh" / "model.safetensors"
    sharded.parent.mkdir()
    assert main(["convert", ckpt, str(sharded), "--max-shard-size", "20B"]) == 0
    index = f"{sharded}.index.json"
    assert capsys.readouterr().out.endswith(
        f"(4 leaves) to safetensors shards indexed by {index}\n"
    )
    with st.open(index) as src:
        same_bits(
            src.read(("params", "enc", "kernel")), np.asarray(tree["params"]["enc"]["kernel"])
        )


def test_convert_refuses_what_safetensors_cannot_hold(tmp_path, capsys):
    ckpt = jc.save(tmp_path / "ckpt", tree_with_key())
    dst = tmp_path / "m.safetensors"
    code = main(["convert", ckpt, str(dst)])
    err = capsys.readouterr().err
    assert code == 2 and "The leaf at ['rng'] is a typed PRNG key, which safetensors cannot" in err
    assert not dst.exists() and os.listdir(tmp_path) == ["ckpt"]
    for tree, message in [
        ({"name": "bert"}, "The leaf at ['name'] is a Python str, which safetensors cannot hold"),
        ({"a.b": np.ones(1)}, "The leaf at ['a.b'] has a key that is empty or holds a '.'"),
        ({"c": np.ones(1, np.complex128)}, "The leaf at ['c'] has the dtype complex128"),
    ]:
        src = jc.save(tmp_path / uuid.uuid4().hex, tree)
        with pytest.raises(jc.UnsupportedLeafError, match=message.replace("[", r"\[")):
            jc.convert(src, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="max_shard_size applies to safetensors"):
        jc.convert(ckpt, tmp_path / "x.msgpack", max_shard_size="1GB")


def test_convert_a_typed_key_to_msgpack(tmp_path, capsys):
    """Was a raw TypeError: Flax's msgpack has no key type, so the key data is written."""
    tree = tree_with_key()
    ckpt = jc.save(tmp_path / "ckpt", tree)
    dst = tmp_path / "s.msgpack"
    assert main(["convert", ckpt, str(dst)]) == 0
    assert capsys.readouterr().out.endswith("; 1 typed PRNG keys written as their key data\n")
    back = serialization.msgpack_restore(dst.read_bytes())
    np.testing.assert_array_equal(back["rng"], jax.random.key_data(tree["rng"]))
    same_bits(back["params"]["layers"]["0"]["w"], np.array([-0.0, np.nan], np.float32))


def test_safetensors_to_msgpack(tmp_path):
    src = tmp_path / "m.safetensors"
    stn.save_file({"dense.kernel": np.ones((2, 2), ml_dtypes.bfloat16)}, str(src))
    dst = tmp_path / "m.msgpack"
    jc.convert(src, dst)
    target = {"dense": {"kernel": np.zeros((2, 2), ml_dtypes.bfloat16)}}
    got = serialization.from_bytes(target, dst.read_bytes())
    same_bits(got["dense"]["kernel"], np.ones((2, 2), ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="is already a safetensors file. Fix: give a DST"):
        jc.convert(src, tmp_path / "again.safetensors")


# ------------------------------------------------------------------------------ object stores


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    srv = servers.start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    servers.create_s3_bucket(srv.url, "safetensors-test")
    yield srv
    srv.stop()


def test_reads_byte_ranges_on_s3(s3, monkeypatch):
    for k, v in servers.DUMMY_AWS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    big = np.arange(100 * 8, dtype=np.float32).reshape(100, 8)
    root = f"s3://safetensors-test/{uuid.uuid4().hex}/"
    storage.at(root).open_kv().write(
        "model.safetensors", stn.save({"w": big, "b": big[0]})
    ).result()
    url = root + "model.safetensors"
    assert st.recognise(url) and not st.recognise(root + "absent.safetensors")
    with st.open(url) as src:
        same_bits(src.read(("w",)), big)
        same_bits(src.read(("w",), (slice(10, 12),)), big[10:12])
        same_bits(src.read(("b",)), big[0])


def test_slices_of_later_axes_on_s3_are_byte_ranges(s3, monkeypatch):
    """Runs of a MiB or more are requested as byte ranges of just those bytes, together."""
    for k, v in servers.DUMMY_AWS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    wide = np.arange(3 * 2 * (1 << 18), dtype=np.float32).reshape(3, 2, 1 << 18)
    root = f"s3://safetensors-test/{uuid.uuid4().hex}/"
    storage.at(root).open_kv().write("m.safetensors", stn.save({"w": wide})).result()
    with st.open(root + "m.safetensors") as src:
        asked = []
        kv = src.files[0]._kv
        real = kv.read

        class Counted:
            def read(self, key, byte_range=None):
                asked.append(byte_range.stop - byte_range.start)
                return real(key, byte_range=byte_range)

        src.files[0]._kv = Counted()
        same_bits(src.read(("w",), (slice(None), slice(1, 2))), wide[:, 1:2])
        assert asked == [1 << 20] * 3
        asked.clear()
        same_bits(src.read(("w",), (slice(1, 2), slice(None), slice(0, 8))), wide[1:2, :, :8])
        assert asked == [2 << 20]  # short runs: the whole row of the first axis


def _read_chars() -> int:
    """Bytes this process has read through system calls (``rchar``), reading /proc included."""
    with open("/proc/self/io", "rb", buffering=0) as f:
        return int(next(x for x in f.read().split(b"\n") if x.startswith(b"rchar")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="Linux's /proc/self/io")
def test_restoring_one_tensor_reads_its_bytes_and_the_header(tmp_path):
    """Was the tensor, the header and two 8 KiB buffers of the file's first bytes (what a
    buffered open reads to sniff 9 of them)."""
    path = tmp_path / "m.safetensors"
    stn.save_file({f"layer_{i}.k": np.ones((64, 256), np.float32) for i in range(40)}, str(path))
    header = path.stat().st_size - 40 * 64 * 256 * 4
    target = {"layer_3": {"k": jax.ShapeDtypeStruct((64, 256), np.float32)}}
    jc.restore(path, target, partial=True)  # imports and caches warmed
    before = _read_chars()
    got = jc.restore(path, target, partial=True)
    read = _read_chars() - before
    np.testing.assert_array_equal(got["layer_3"]["k"], np.ones((64, 256), np.float32))
    sniffed, proc = 9 + 8, 1024  # the format's magic bytes; the read of /proc/self/io
    assert 64 * 256 * 4 + header <= read <= 64 * 256 * 4 + header + sniffed + proc
