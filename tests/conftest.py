"""Suite-wide strictness: 8 CPU devices for sharding tests, strict dtype promotion; the S3 (moto)
and GCS (fake-gcs-server) servers the storage tests share, started once per session."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402
import servers  # noqa: E402

import jaxckpt as jc  # noqa: E402

BUCKET = servers.BUCKET


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    srv = servers.start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    servers.create_s3_bucket(srv.url, BUCKET)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def gcs_server():
    srv = servers.start_fake_gcs()
    servers.create_gcs_bucket(srv.url, BUCKET)
    yield srv
    srv.stop()


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REGION",
             "AWS_DEFAULT_REGION", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")  # fmt: skip


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """S3 as a user configures it: dummy credentials and ``AWS_ENDPOINT_URL_S3``."""
    for k in _AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in servers.DUMMY_AWS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
    yield s3_server
    jc.set_storage_options("s3")


@pytest.fixture
def gcs_env(gcs_server, monkeypatch):
    """GCS through TensorStore's own test variables (``STORAGE_EMULATOR_HOST`` is tested apart)."""
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs_server.url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    yield gcs_server
    jc.set_storage_options("gs")
