"""How the parts of local-tier steps travel between the processes of a job.

Two transports, one interface (``send``, ``fail``, ``receive``); ``$JAXCKPT_LOCAL_TRANSPORT``
picks one, the same in every process:

- ``tcp`` (the default): each process listens on a port of its own and publishes its address
  through the distributed runtime's key-value store; a sender connects to the receiver and
  streams the part's files (``socket.sendfile``), split over ``STREAMS`` connections at once
  so that the receiver writes them on as many threads (``os.splice`` where there is one: no
  copy through its memory), syncs them, then answers; the part counts once every connection
  brought its files whole. Hosts must reach each other on ephemeral TCP ports, as JAX's own collectives do.
- ``kv``: the files go through the key-value store itself, 16 MiB per value: nothing but the
  job's connection to process 0 is needed, but every byte passes through process 0's
  coordination service, at tens of MB/s.

A part received is staged whole in the local directory (a ``.jaxckpt-tmp-`` name), then
moved into place by :func:`jaxckpt.local_tier.parts.place`.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from jaxckpt import storage as _storage
from jaxckpt.checkpoint import multihost as _multihost
from jaxckpt.errors import CheckpointError, CoordinationError
from jaxckpt.local_tier import parts as _local_parts

TRANSPORT_ENV = "JAXCKPT_LOCAL_TRANSPORT"
ADDRESS_ENV = "JAXCKPT_LOCAL_ADDRESS"
STREAMS = 2  # connections a part's files are sent over at once (tcp)
KV_CHUNK = 16 << 20  # bytes per key-value store value: smaller values keep its memory low
_NEXT_FIX = "Fix: see that process's log for the cause"


def transport(root: str, peers: bool = True) -> Kv | Tcp:
    """The transport ``$JAXCKPT_LOCAL_TRANSPORT`` names (default ``tcp``)."""
    name = os.environ.get(TRANSPORT_ENV, "").strip() or "tcp"
    if name == "tcp" and peers:
        return Tcp(root)
    if name in ("kv", "tcp"):
        return Kv(root)
    raise ValueError(
        f"{TRANSPORT_ENV}={name!r} is not a transport of the local tier. Fix: set it to 'tcp' "
        "(direct connections between the processes, the default) or 'kv' (through JAX's "
        "key-value store), the same in every process."
    )


def _staging(root: str) -> str:
    path = os.path.join(root, f"{_storage.TMP_MARK}in-{uuid.uuid4().hex[:12]}")
    os.makedirs(path)
    return path


def _sizes(path: str) -> tuple[list[str], list[int]]:
    names = _local_parts.files_of(path)
    return names, [os.path.getsize(os.path.join(path, n)) for n in names]


def _missing(what: str, sender: int, why: str) -> CoordinationError:
    return CoordinationError(f"jaxckpt: {what} did not come from process {sender}: {why}.")


# ---------------------------------------------------------------------------- key-value store


class Kv:
    """Parts posted to the distributed runtime's key-value store, in chunks."""

    def __init__(self, root: str):
        self.root = root

    def address(self) -> None:
        return None

    def connect(self, addresses: list[Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, key: str, path: str, to: int, what: str, durable: bool = True) -> None:
        names, sizes = _sizes(path)
        client = _multihost._client()
        chunks = 0
        for chunk in _chunked(path, names):
            client.key_value_set_bytes(f"{key}/c/{chunks}", chunk)
            chunks += 1
        # The header last: a receiver that reads it finds every chunk posted.
        head = {"files": [names, sizes], "chunks": chunks, "durable": durable}
        client.key_value_set(f"{key}/head", json.dumps(head))

    def fail(self, key: str, error: BaseException, to: int) -> None:
        try:
            message = f"{type(error).__name__}: {error}"[:2000]
            _multihost._client().key_value_set(f"{key}/head", json.dumps({"error": message}))
        except Exception:  # the receiver's wait ends with the runtime's own error then
            pass

    def receive(self, key: str, sender: int, what: str) -> str:
        client = _multihost._client()
        seconds = _multihost.timeout_s()
        ms = max(1, int(seconds * 1000))
        try:
            head = json.loads(client.blocking_key_value_get(f"{key}/head", ms))
        except Exception as e:
            where = f"{what} waited for process {sender} to send it"
            raise _multihost._runtime_error(where, seconds, e, late=[str(sender)]) from e
        client.key_value_delete(f"{key}/head")
        if "error" in head:
            raise _missing(what, sender, f"it failed: {head['error']}. {_NEXT_FIX}")
        staged = _staging(self.root)
        try:
            chunks = _Chunks(client, key, ms, head["chunks"])
            for name, size in zip(*head["files"], strict=True):
                full = os.path.join(staged, name)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "wb") as out:
                    for piece in chunks.take(size):
                        out.write(piece)
                    if head["durable"]:
                        out.flush()
                        os.fsync(out.fileno())
            if chunks.left:
                raise CheckpointError(f"jaxckpt: {what} from process {sender} had bytes to spare.")
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged


def _chunked(path: str, names: list[str]) -> Iterator[bytes]:
    buf = bytearray()
    for name in names:
        with open(os.path.join(path, name), "rb") as f:
            while block := f.read(KV_CHUNK - len(buf)):
                buf += block
                if len(buf) >= KV_CHUNK:
                    yield bytes(buf)
                    buf.clear()
    if buf:
        yield bytes(buf)


class _Chunks:
    """The chunks posted under ``key``, read in order as one stream of bytes (each chunk is
    deleted from the store once read)."""

    def __init__(self, client: Any, key: str, ms: int, n: int):
        self.client, self.key, self.ms, self.n = client, key, ms, n
        self.next = 0
        self.buf = memoryview(b"")

    @property
    def left(self) -> bool:
        return bool(len(self.buf)) or self.next < self.n

    def take(self, n: int) -> Iterator[memoryview]:
        while n:
            if not len(self.buf):
                if self.next >= self.n:
                    raise CheckpointError(f"jaxckpt: the part posted under {self.key} is short.")
                key = f"{self.key}/c/{self.next}"
                self.buf = memoryview(self.client.blocking_key_value_get_bytes(key, self.ms))
                self.client.key_value_delete(key)
                self.next += 1
            piece, self.buf = self.buf[:n], self.buf[n:]
            n -= len(piece)
            yield piece


# ---------------------------------------------------------------------------- tcp


def _own_ip() -> str:
    """The address peers reach this process at: ``$JAXCKPT_LOCAL_ADDRESS``, else the one this
    host uses to reach JAX's coordinator (the job's own network)."""
    given = os.environ.get(ADDRESS_ENV, "").strip()
    if given:
        return given
    from jax._src import distributed

    coordinator = getattr(distributed.global_state, "coordinator_address", None) or ""
    host = coordinator.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
    if host in ("localhost", "::1") or host.startswith("127."):
        return "::1" if host == "::1" else "127.0.0.1"  # the whole job runs on this machine
    # On process 0 the coordinator is this host, whose name may resolve to a loopback
    # address: then the address of the default route's interface.
    for toward in (host, "8.8.8.8"):
        try:
            family, _, _, _, where = socket.getaddrinfo(toward, 1, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(where)  # no packet is sent: this picks the route, so the address
                ip = str(s.getsockname()[0])
        except OSError:
            continue
        if not ip.startswith("127.") and ip != "::1":
            return ip
    return "127.0.0.1"


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = conn.recv(n - len(out))
        if not got:
            raise EOFError("the connection closed in the middle of the part")
        out += got
    return bytes(out)


class _Into:
    """Moves bytes from a connection into files: on Linux through a pipe (``splice``), the
    kernel moving them without a copy through this process's memory; else read and written."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.pipe: tuple[int, int] | None = None
        if hasattr(os, "splice"):
            self.pipe = os.pipe()
            try:  # fewer calls per file; the system's limit may refuse it
                fcntl.fcntl(self.pipe[1], getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
            except OSError:
                pass
        self.view: memoryview | None = None

    def close(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def file(self, out: Any, size: int) -> None:
        if self.pipe is None:
            self._copy(out, size)
            out.flush()
            return
        r, w = self.pipe
        fd, sock = out.fileno(), self.conn.fileno()
        while size:
            try:
                got = os.splice(sock, w, min(size, 1 << 20))
            except BlockingIOError:  # the socket has a timeout: it does not block
                if not select.select([self.conn], [], [], self.conn.gettimeout())[0]:
                    raise TimeoutError("nothing came within the timeout") from None
                continue
            if not got:
                raise EOFError("the connection closed in the middle of the part")
            size -= got
            while got:
                got -= os.splice(r, fd, got)

    def _copy(self, out: Any, size: int) -> None:
        if self.view is None:
            self.view = memoryview(bytearray(8 << 20))
        view = self.view
        while size:
            got = self.conn.recv_into(view[: min(size, len(view))])
            if not got:
                raise EOFError("the connection closed in the middle of the part")
            out.write(view[:got])
            size -= got


class Tcp:
    """Parts streamed over direct connections between the processes."""

    def __init__(self, root: str):
        self.root = root
        self.ip = _own_ip()
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        self.server = socket.create_server(("", 0), family=family, backlog=64)
        self.port = self.server.getsockname()[1]
        self.addresses: list[Any] = []
        self._staged: dict[str, tuple[str | None, str | None]] = {}
        self._cond = threading.Condition()
        self._streams: dict[str, list[Any]] = {}  # key -> [staging, connections left, error]
        threading.Thread(target=self._accept, name="jaxckpt-local-accept", daemon=True).start()

    def address(self) -> list[Any]:
        return [self.ip, self.port]

    def connect(self, addresses: list[Any]) -> None:
        self.addresses = addresses

    def close(self) -> None:
        try:  # wakes the thread blocked in accept (close alone would leave it listening)
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        key, streams, done = None, 1, False
        with conn:
            try:
                conn.settimeout(_multihost.timeout_s())
                (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                head = json.loads(_recv_exact(conn, n))
                key = head["key"]
                if "error" in head:
                    self._put(key, None, f"it failed: {head['error']}. {_NEXT_FIX}")
                    return
                streams = int(head.get("streams", 1))
                staged = self._stream_in(key, streams)
                into = _Into(conn)
                try:
                    for name, size in zip(*head["files"], strict=True):
                        full = os.path.join(staged, name)
                        os.makedirs(os.path.dirname(full), exist_ok=True)
                        with open(full, "wb") as out:
                            into.file(out, size)
                            if head["durable"]:
                                os.fsync(out.fileno())
                finally:
                    into.close()
                done = True  # counted: a lost answer is the sender's error alone
                self._stream_done(key, None, streams)
                conn.sendall(b"\x01")
            except Exception as e:
                if key is not None and not done:
                    why = f"it was cut short ({type(e).__name__}: {e})"
                    self._stream_done(key, why, streams)

    def _stream_in(self, key: str, streams: int) -> str:
        """The staging directory of the part under ``key``, which arrives in ``streams``
        connections (the first to come makes it)."""
        with self._cond:
            entry = self._streams.setdefault(key, [None, streams, None])
            if entry[0] is None:
                entry[0] = _staging(self.root)
            return str(entry[0])

    def _stream_done(self, key: str, error: str | None, streams: int) -> None:
        """One of the ``streams`` connections of the part under ``key`` ended (``error``: cut
        short); the part is staged once all ended, whole only if none failed."""
        with self._cond:
            entry = self._streams.setdefault(key, [None, streams, None])
            entry[1] -= 1
            entry[2] = entry[2] or error
            if entry[1] > 0:
                return
            del self._streams[key]
        staged, failed = entry[0], entry[2]
        if failed is not None and staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        self._put(key, None if failed else staged, failed)

    def _put(self, key: str, staged: str | None, error: str | None) -> None:
        with self._cond:
            self._staged[key] = (staged, error)
            self._cond.notify_all()

    def _connect(self, to: int) -> socket.socket:
        ip, port = self.addresses[to]
        return socket.create_connection((ip, port), timeout=_multihost.timeout_s())

    def send(self, key: str, path: str, to: int, what: str, durable: bool = True) -> None:
        """Streams the part at ``path`` to process ``to``, its files split over ``STREAMS``
        connections at once (the receiver's writing takes as many threads); it syncs what
        it wrote before it answers, unless not ``durable`` (a restore reads it back at once)."""
        names, sizes = _sizes(path)
        groups: list[tuple[list[str], list[int]]] = [([], []) for _ in range(STREAMS)]
        for name, size in sorted(zip(names, sizes, strict=True), key=lambda f: -f[1]):
            group = min(groups, key=lambda g: sum(g[1]))  # the fewest bytes so far
            group[0].append(name)
            group[1].append(size)
        groups = [g for g in groups if g[0]] or [([], [])]
        errors: list[BaseException] = []

        def stream(files: tuple[list[str], list[int]]) -> None:
            head = {"key": key, "files": files, "durable": durable, "streams": len(groups)}
            raw = json.dumps(head).encode()
            try:
                with self._connect(to) as s:
                    s.sendall(struct.pack("!Q", len(raw)) + raw)
                    for name in files[0]:
                        with open(os.path.join(path, name), "rb") as f:
                            s.sendfile(f)
                    if _recv_exact(s, 1) != b"\x01":
                        raise EOFError("the receiver did not confirm it")
            except (OSError, EOFError) as e:
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(g,)) for g in groups[1:]]
        for t in threads:
            t.start()
        stream(groups[0])
        for t in threads:
            t.join()
        if errors:
            ip, port = self.addresses[to]
            raise CoordinationError(
                f"jaxckpt: could not send {what} to process {to} at {ip}:{port}: {errors[0]}. "
                f"Fix: let the job's hosts reach each other on TCP ports, or set {TRANSPORT_ENV}=kv"
                " in every process (slower: through JAX's key-value store)."
            ) from errors[0]

    def fail(self, key: str, error: BaseException, to: int) -> None:
        head = json.dumps({"key": key, "error": f"{type(error).__name__}: {error}"[:2000]})
        try:
            with self._connect(to) as s:
                s.sendall(struct.pack("!Q", len(head)) + head.encode())
        except OSError:  # the receiver's wait ends with its timeout then
            pass

    def receive(self, key: str, sender: int, what: str) -> str:
        seconds = _multihost.timeout_s()
        deadline = time.monotonic() + seconds
        with self._cond:
            while key not in self._staged:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _missing(
                        what,
                        sender,
                        f"nothing arrived within {seconds:g} s: it died, hung, or cannot reach "
                        f"this process at {self.ip}:{self.port}. Fix: see the log of process "
                        f"{sender}; if its hosts cannot reach each other on TCP ports, set "
                        f"{TRANSPORT_ENV}=kv in every process",
                    )
                self._cond.wait(left)
            staged, error = self._staged.pop(key)
        if error is not None or staged is None:
            raise _missing(what, sender, error or "nothing was staged")
        return staged
