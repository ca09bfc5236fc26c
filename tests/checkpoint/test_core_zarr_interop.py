"""zarr-python reads a checkpoint's arrays with no jaxckpt code."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr
from jax.sharding import NamedSharding, PartitionSpec

import jaxckpt as jc


def test_zarr_python_reads_params(tmp_path, monkeypatch):
    # Leaves under 1 MiB are packed by default (DESIGN: packed leaves are read through the
    # metadata, see test_packing.py); unpacked, each of them is its own zarr array.
    monkeypatch.setattr(jc.checkpoint.plan, "PACK_BELOW", 0)
    kernel = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    tree = {
        "params": {
            "encoder": {"kernel": jnp.asarray(kernel), "bias": jnp.arange(32, dtype=jnp.int32)}
        },
        "mask": np.array([True, False, True]),
        "z": np.array([1 + 2j, -3j], np.complex64),
        "big": np.arange(300_000, dtype=np.float32).reshape(300, 1000),  # over 1 MiB
        "step": 10,
    }
    path = jc.save(tmp_path / "ckpt-10", tree)
    del tree["params"]["encoder"]["kernel"]  # compare with what was saved, not the live tree

    group = zarr.open_group(path, mode="r")
    arr = group["params/encoder/kernel"]
    assert arr.shape == (64, 32) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[...], kernel)
    np.testing.assert_array_equal(arr[3:5, 7], kernel[3:5, 7])
    np.testing.assert_array_equal(group["params"]["encoder"]["bias"][...], np.arange(32))
    np.testing.assert_array_equal(group["mask"][...], tree["mask"])
    np.testing.assert_array_equal(group["z"][...], tree["z"])
    np.testing.assert_array_equal(group["big"][...], tree["big"])
    assert group.attrs["jaxckpt"]["format_version"] >= 1
    with open(f"{path}/params/encoder/kernel/zarr.json") as f:
        assert {"name": "crc32c"} in json.load(f)["codecs"]


@pytest.mark.parametrize("spec", [PartitionSpec("x"), PartitionSpec("x", "y"), PartitionSpec()])
def test_zarr_python_reads_sharded_arrays(tmp_path, spec, monkeypatch):
    monkeypatch.setattr(jc.checkpoint.plan, "PACK_BELOW", 0)  # small enough to be packed otherwise
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    data = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    x = jax.device_put(data, NamedSharding(mesh, spec))
    path = jc.save(tmp_path / "c", {"w": x})
    arr = zarr.open_group(path, mode="r")["w"]
    assert arr.chunks == tuple(x.sharding.shard_shape(x.shape))
    np.testing.assert_array_equal(arr[...], data)


def test_a_chunk_of_many_read_and_write_steps_is_checksummed_whole(tmp_path, monkeypatch):
    """A chunk is written and read ``STEP`` bytes at a time, its CRC-32C carried across the
    steps: zarr-python checks the same checksum, and a byte flipped in any step is caught."""
    monkeypatch.setattr(jc.checkpoint.plan, "PACK_BELOW", 0)  # its own zarr array, one chunk
    monkeypatch.setattr(
        jc.storage.chunk_files, "STEP", 3 << 10
    )  # 40,000 bytes: 14 steps, the last short
    data = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    path = jc.save(tmp_path / "c", {"w": data})
    np.testing.assert_array_equal(zarr.open_group(path, mode="r")["w"][...], data)
    np.testing.assert_array_equal(jc.restore(path)["w"], data)
    (chunk,) = [
        p for p in (tmp_path / "c" / "w").rglob("*") if p.is_file() and p.name != "zarr.json"
    ]
    raw = bytearray(chunk.read_bytes())
    raw[-100] ^= 1  # in the last step
    chunk.write_bytes(bytes(raw))
    with pytest.raises(jc.CorruptCheckpointError, match="'w' .* crc32c"):
        jc.restore(path)


@pytest.mark.parametrize("n", [0, 1, 1000, (64 << 10) - 1, 64 << 10, (1 << 20) + 3])
def test_the_gil_free_checksum_is_crc32c(n):
    """Checksums of large buffers run through libcrc32c without the GIL, so that the I/O threads
    checksum at once; small ones through the extension. Both give CRC-32C, in one call or
    extended piece by piece."""
    import google_crc32c

    assert jc.format.checksum._crc32c_extend is not None  # google-crc32c's wheel ships the library
    raw = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    want = google_crc32c.value(raw.tobytes())
    assert jc.format.checksum.crc32c(raw) == want
    assert (
        jc.format.checksum.crc32c(raw[n // 3 :], jc.format.checksum.crc32c(raw[: n // 3])) == want
    )
