"""What jaxckpt adds to TensorStore's ``s3`` and ``gcs`` drivers: retries bounded in time by
default, credentials looked up as the AWS clients do, and errors that say what was tried.

TensorStore's own retry default (32 attempts, 1 s doubling to 32 s) keeps a call to an
unreachable store busy for about a quarter of an hour; jaxckpt's default gives up within about
a minute (docs/object_stores.md, "Errors and retries"). ``jc.set_storage_options`` overrides it.
"""

from __future__ import annotations

import os
from typing import Any

# A failed request waits initial_delay, doubling up to max_delay, plus up to 1 s of jitter:
# 1 + 2 + 4 + 8 + 16 + 16 s (and jitter) before the sixth retry fails, under a minute.
RETRIES: dict[str, Any] = {"max_retries": 6, "initial_delay": "1s", "max_delay": "16s"}
RETRY_MEMBER = {"s3": "s3_request_retries", "gs": "gcs_request_retries"}


def _aws_files() -> list[str]:
    home = os.path.expanduser("~")
    env = os.environ
    return [
        env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials"),
        env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"),
    ]


def aws_credentials() -> dict[str, Any] | None:
    """The ``aws_credentials`` member jaxckpt picks from the environment; None: TensorStore's
    default chain (profile files, web identity, containers, then the instance metadata)."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return {"type": "environment"}  # as boto3: the environment first
    others = ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if any(env.get(v) for v in (*others, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")):
        return None
    if any(os.path.exists(f) for f in _aws_files()):
        return None
    # Only the instance metadata service is left: asking for it alone spares the log a line
    # per missing profile file, and fails at once, not after retries, where it does not answer.
    return {"type": "imds"}


def _endpoint(scheme: str, spec: dict[str, Any], options: dict[str, Any]) -> str:
    env = os.environ
    if scheme == "gs":
        url = env.get("TENSORSTORE_GCS_HTTP_URL")
        if url:
            came = "STORAGE_EMULATOR_HOST" if env.get("STORAGE_EMULATOR_HOST") else None
            return f"{url} (from {came or 'TENSORSTORE_GCS_HTTP_URL'})"
        return "https://storage.googleapis.com"
    if "endpoint" in options:
        return f"{options['endpoint']} (from jc.set_storage_options)"
    if "endpoint" in spec:
        came = "AWS_ENDPOINT_URL_S3" if env.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
        return f"{spec['endpoint']} (from {came})"
    return f"Amazon S3 (https://{spec.get('bucket', 'BUCKET')}.s3.amazonaws.com)"


def _credentials(scheme: str, spec: dict[str, Any], options: dict[str, Any]) -> str:
    if scheme == "gs":
        if os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING"):
            return "the token in GOOGLE_AUTH_TOKEN_FOR_TESTING"
        adc = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        return f"the key file {adc}" if adc else "the application default credentials"
    creds = spec.get("aws_credentials")
    if "aws_credentials" in options:
        return f"the credentials {creds} (from jc.set_storage_options)"
    if creds == {"type": "environment"}:
        return "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if creds == {"type": "imds"}:
        return (
            "the EC2 instance metadata service (no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            f"AWS_PROFILE, {' nor '.join(_aws_files())})"
        )
    return "the default AWS chain (AWS_PROFILE and ~/.aws files, web identity, instance metadata)"


def explain(scheme: str, spec: dict[str, Any], options: dict[str, Any], error: str) -> str:
    """What was tried and how to fix it, for the storage ``error`` of a ``scheme`` location
    opened with the kvstore ``spec`` (``options``: what ``jc.set_storage_options`` set)."""
    member = RETRY_MEMBER[scheme]
    retries = spec.get(member, RETRIES).get("max_retries", 32)
    tried = (
        f" Tried: the endpoint {_endpoint(scheme, spec, options)}, with "
        f"{_credentials(scheme, spec, options)}, retrying up to {retries} times ({member})."
    )
    where = "jc.set_storage_options('s3', endpoint=...)"
    if scheme == "s3" and "Failed to get credentials" in error:
        return tried + (
            " Fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with "
            "~/.aws/credentials); for a bucket or a store that needs no credentials, "
            "jc.set_storage_options('s3', aws_credentials={'type': 'anonymous'})."
        )
    if "retry attempts failed" in error or "CURL error" in error:
        if scheme == "s3":
            fix = (
                f"check that the endpoint is right and reachable (AWS_ENDPOINT_URL_S3, or {where})"
            )
        else:
            fix = (
                "check that the endpoint is right and reachable (STORAGE_EMULATOR_HOST for an "
                "emulator, else the network path to storage.googleapis.com)"
            )
        return tried + (
            f" Fix: {fix}; a slow or flaky store may need more time: "
            f"jc.set_storage_options({scheme!r}, {member}={{'max_retries': 10, "
            "'initial_delay': '1s', 'max_delay': '32s'}) waits about 3 minutes."
        )
    if scheme == "s3":
        return tried + (
            f" Fix: check the bucket name, the endpoint (AWS_ENDPOINT_URL_S3 or {where}) and "
            "the AWS credentials."
        )
    return tried + (
        " Fix: check the bucket name, the application default credentials, and "
        "STORAGE_EMULATOR_HOST when using an emulator."
    )
