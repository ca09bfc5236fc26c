"""Starting real multi-process JAX jobs on 127.0.0.1 for the tests: ``launch`` runs a worker
script's scenario in ``n`` processes joined by ``jax.distributed``, and kills only them if they
outlive their time."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Proc:
    returncode: int
    output: str
    results: dict[str, dict]  # check name -> the fields the worker reported
    ended: float  # time.time() once it had exited (at most a moment later)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    scenario: str, n: int, directory: str, timeout: float = 90.0, worker: str = WORKER
) -> list[Proc]:
    """Runs ``scenario`` of ``worker`` in ``n`` joined processes; kills only them if they
    outlive ``timeout``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "JAXCKPT_"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory() as results_dir:
        # RESULT lines go to a file of their own: on the shared output, the C++ runtime's log
        # lines (Gloo's) can land in the middle of one.
        results = [os.path.join(results_dir, f"{i}.jsonl") for i in range(n)]
        procs = [
            subprocess.Popen(
                [sys.executable, worker, scenario, str(i), str(n), str(port), directory],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**env, "MULTIHOST_RESULTS": results[i]},
                start_new_session=True,  # its own process group: killing it reaches nothing else
            )
            for i in range(n)
        ]
        deadline = time.monotonic() + timeout
        outputs, ended = [], []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                outputs.append(out)
                ended.append(time.time())
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            logs = "\n".join(
                f"--- process {i}\n{_tail(p.communicate()[0])}" for i, p in enumerate(procs)
            )
            pytest.fail(f"{scenario}: the {n} processes did not finish within {timeout} s\n{logs}")
        return [
            Proc(p.returncode, out, _results(path), end)
            for p, out, path, end in zip(procs, outputs, results, ended, strict=True)
        ]


def _results(path: str) -> dict[str, dict]:
    found: dict[str, dict] = {}
    if not os.path.exists(path):
        return found
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            found.setdefault(r["check"], r)
            found[r["check"] + "@" + str(r.get("step", ""))] = r
    return found


def _tail(text: str, lines: int = 40) -> str:
    keep = [ln for ln in text.splitlines() if not ln.startswith(("W0000", "I0000"))]
    return "\n".join(keep[-lines:])


def assert_all_done(procs: list[Proc]) -> None:
    for i, p in enumerate(procs):
        assert p.returncode == 0 and "done" in p.results, f"process {i}:\n{_tail(p.output)}"
