"""Bounded waits on object stores: an unreachable endpoint or missing credentials fail with a
message naming the URL, what was tried (endpoint, credentials, retries) and the fix."""

import re

import numpy as np
import pytest
import servers

import jaxckpt as jc
from jaxckpt import storage as _storage
from jaxckpt.storage import object_stores as _object_stores

FAST = {"max_retries": 2, "initial_delay": "10ms", "max_delay": "20ms"}
AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """No AWS setting at all, and a home without ~/.aws; options reset afterwards."""
    for k in AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    yield tmp_path
    jc.set_storage_options("s3")
    jc.set_storage_options("gs")


def closed_port_url():
    return f"http://127.0.0.1:{servers.free_port()}"  # nothing listens there


def test_default_retries_are_bounded_and_settable(aws):
    bounded = {"max_retries": 6, "initial_delay": "1s", "max_delay": "16s"}
    assert _storage.at("s3://b/run").kvstore_spec()["s3_request_retries"] == bounded
    assert _storage.at("gs://b/run").kvstore_spec()["gcs_request_retries"] == bounded
    jc.set_storage_options("s3", s3_request_retries=FAST)
    assert _storage.at("s3://b/run").kvstore_spec()["s3_request_retries"] == FAST


def test_unreachable_s3_endpoint_fails_naming_what_was_tried(aws, monkeypatch):
    endpoint = closed_port_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    jc.set_storage_options("s3", s3_request_retries=FAST)
    expected = r"Accessing s3://bucket/run/ckpt-1 failed: .*Could not connect.*\. " + re.escape(
        f"Tried: the endpoint {endpoint} (from AWS_ENDPOINT_URL_S3), with AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY, retrying up to 2 times (s3_request_retries). Fix: check "
        "that the endpoint is right and reachable (AWS_ENDPOINT_URL_S3, or "
        "jc.set_storage_options('s3', endpoint=...)); a slow or flaky store may need more "
        "time: jc.set_storage_options('s3', s3_request_retries="
    )
    with pytest.raises(jc.CheckpointError, match=expected):
        jc.save("s3://bucket/run/ckpt-1", {"w": np.ones(3)})
    with pytest.raises(jc.CheckpointError, match=expected.replace("/ckpt-1", "")):
        jc.CheckpointManager("s3://bucket/run").latest_step  # noqa: B018
    jc.set_storage_options("s3", endpoint=endpoint, s3_request_retries=FAST)
    with pytest.raises(jc.CheckpointError, match=re.escape(f"{endpoint} (from jc.set_storage")):
        jc.restore("s3://bucket/run/ckpt-1")


def test_unreachable_gcs_emulator_fails_naming_what_was_tried(aws, monkeypatch):
    endpoint = closed_port_url()
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", endpoint)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    jc.set_storage_options("gs", gcs_request_retries=FAST)
    with pytest.raises(
        jc.CheckpointError,
        match=r"Accessing gs://bucket/ckpt failed: .*Could not connect.*\. "
        + re.escape(
            f"Tried: the endpoint {endpoint} (from TENSORSTORE_GCS_HTTP_URL), with the token in "
            "GOOGLE_AUTH_TOKEN_FOR_TESTING, retrying up to 2 times (gcs_request_retries). Fix: "
            "check that the endpoint is right and reachable (STORAGE_EMULATOR_HOST"
        ),
    ):
        jc.restore("gs://bucket/ckpt")


def test_without_credentials_only_the_instance_metadata_is_asked(aws, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed_port_url())
    assert _storage.at("s3://bucket/run").kvstore_spec()["aws_credentials"] == {"type": "imds"}
    jc.set_storage_options("s3", s3_request_retries=FAST)
    with pytest.raises(jc.CheckpointError) as e:
        jc.save("s3://bucket/run/ckpt-1", {"w": np.ones(3)})
    home = str(aws)
    assert (
        "with the EC2 instance metadata service (no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
        f"AWS_PROFILE, {home}/.aws/credentials nor {home}/.aws/config)"
    ) in str(e.value)
    # A profile file, web identity or container credentials: TensorStore's default chain.
    (aws / ".aws").mkdir()
    (aws / ".aws" / "credentials").write_text("[default]\n")
    assert "aws_credentials" not in _storage.at("s3://bucket/run").kvstore_spec()
    (aws / ".aws" / "credentials").unlink()
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(aws / "token"))
    assert "aws_credentials" not in _storage.at("s3://bucket/run").kvstore_spec()


def test_a_credentials_failure_says_how_to_give_some(aws):
    spec = _storage.at("s3://bucket/run").kvstore_spec()
    error = "INTERNAL: Failed to get credentials from provider: aws-c-http: Path is invalid"
    assert _object_stores.explain("s3", spec, {}, error).endswith(
        "Fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with "
        "~/.aws/credentials); for a bucket or a store that needs no credentials, "
        "jc.set_storage_options('s3', aws_credentials={'type': 'anonymous'})."
    )
