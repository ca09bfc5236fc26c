"""Soak and crash figures for jaxckpt's saves (``make soak``; not part of ``make test``).

1. Kill trials: a process saving ``soak_worker.tree_of(step)`` step after step (``jc.save``,
   ``jc.save_async``, or a ``CheckpointManager`` saving synchronously or asynchronously) is
   SIGKILLed during a save, aimed at each phase of a save in turn (plan, snapshot, mkdir,
   chunks, metadata, fsync, commit, rename, retire, delete, index) or at a random moment.
   After each kill a new manager must list every checkpoint committed before the kill (all
   that retention would keep), each must restore bit-exactly, and once that manager has saved
   again the directory must hold no debris.
2. Memory: one process saves 1,000 times with a manager (``max_to_keep=3``), asynchronously
   and then synchronously, sampling its resident memory, open files and threads after each
   save: after warm-up they must stay flat.

Prints a summary table, writes JSON (benchmarks/results/soak-<date>.json), and exits 1 when a
trial lost a checkpoint, restored wrong bytes or left debris, or when memory, open files or
threads grew past the limits below. The directory a failed trial's kill left is kept.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import soak_worker as sw  # noqa: E402

import jaxckpt as jc  # noqa: E402

MiB = 2**20
# Limits of a memory run, in windows of 10% of its saves (at most 100): first, after warm-up
# (the second window), the middle one and the last one. The last window's median and max RSS
# may exceed those after warm-up by RSS_GROWTH_MIB (the heap settles for a few hundred saves)
# and the middle window's by RSS_SETTLED_MIB (by then it has settled: a leak keeps growing);
# the most files open in the last window may exceed the most after warm-up by FD_SLACK (saves in
# flight hold a few open), and after close() no more are open; threads never exceed their
# count after warm-up.
RSS_GROWTH_MIB = 64
RSS_SETTLED_MIB = 16
FD_SLACK = 4
THREAD_SLACK = 0
# Snapshots a memory run's saves in flight may hold (JAXCKPT_ASYNC_HOST_BYTES): saving back to
# back, the loop outruns the disk, and with the default bound (a quarter of RAM) the queue of
# saves in flight, and so RSS, would grow through all 1,000 saves.
HOST_MIB = 32


def env() -> dict[str, str]:
    root = str(HERE.parent)
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}


# ---------------------------------------------------------------------------- kill trials


class Worker:
    """A kill worker, its stdout read by a thread that kills it ``delay`` seconds after the
    ``nth`` start of ``phase`` (or, for phase "random", a random moment after its 2nd save)."""

    def __init__(self, mode: str, directory: str, self_kill: str | None):
        e = env()
        if self_kill:
            e["SOAK_KILL"] = self_kill
        cmd = [sys.executable, str(HERE / "soak_worker.py"), "kill", mode, directory]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e
        )
        self.lines: list[str] = []
        self.aim: tuple[str, int, float] | None = None
        self.durations: dict[str, float] = {}
        self.killed_at: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        begun: collections.Counter[str] = collections.Counter()
        opened: dict[str, float] = {}
        saves = 0
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            w = line.split()
            if not w or self.aim is None or self.killed_at is not None:
                continue
            phase, nth, fraction = self.aim
            if w[0] == "B":
                begun[w[1]] += 1
                opened[w[1]] = float(w[2])
                if w[1] == phase and begun[phase] == nth:
                    # a random moment of the phase: up to its first occurrence's duration
                    self._kill(fraction * self.durations.get(phase, 0.0))
            elif w[0] == "E" and w[1] in opened:
                self.durations.setdefault(w[1], float(w[2]) - opened.pop(w[1]))
            elif w[0] == "saved":
                saves += 1
                if phase == "random" and saves == 2:
                    step_time = float(w[2]) - float(self.lines[0].split()[2])
                    self._kill(fraction * 1.5 * step_time / 2)

    def _kill(self, delay: float) -> None:
        time.sleep(delay)
        self.killed_at = delay
        self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("the worker never reached its kill:\n" + self.log()) from None
        self._reader.join()
        if self.proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the worker exited with {self.proc.returncode}:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def committed(self) -> list[int]:
        """The steps the worker knew committed when it died."""
        last = [line for line in self.lines if line.startswith("committed ")]
        return json.loads(last[-1].split(" ", 1)[1]) if last else []

    def landed(self) -> str:
        """Where the kill landed: inside the phases begun and not ended, else after the last."""
        opened: list[str] = []
        last = "start"
        for line in self.lines:
            w = line.split()
            if w and w[0] == "K":
                return f"{w[2]} {w[1]}"
            if w and w[0] == "B":
                opened.append(w[1])
            elif w and w[0] == "E" and w[1] in opened:
                opened.remove(w[1])
                last = w[1]
            elif w and w[0] == "saved":
                last = "save call"
        return ("in " + "+".join(opened)) if opened else f"after {last}"


KEPT_FILES = ("checkpoint", ".jaxckpt-writer")  # a run's index and its writer lock


def problems(directory: str) -> list[str]:
    """What a directory of checkpoints should not hold once a manager has saved in it."""
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if jc.storage.TMP_MARK in name:
            out.append(f"debris {name}")
        elif name.startswith("ckpt-"):
            if not os.path.isfile(os.path.join(path, "COMMIT")):
                out.append(f"uncommitted {name}")
        elif name not in KEPT_FILES:
            out.append(f"unexpected {name}")
    return out


def check_after_kill(directory: str, committed: list[int], plain: bool) -> dict[str, Any]:
    """The checks after a kill; ``committed``: the steps the killed process knew committed."""
    on_disk = sorted(
        int(n.split("-")[1])
        for n in os.listdir(directory)
        if n.startswith("ckpt-") and "." not in n and os.path.isfile(f"{directory}/{n}/COMMIT")
    )
    out: dict[str, Any] = {"left_by_kill": problems(directory), "lost": [], "wrong": []}
    out["debris"] = []
    try:
        mngr = jc.CheckpointManager(directory, max_to_keep=sw.KEEP, async_save=False)
        listed = mngr.steps
        for s in committed:
            # a manager's retention may have dropped s once KEEP newer steps were committed
            newer = sum(t > s for t in listed)
            if s not in listed and (plain or newer < sw.KEEP):
                out["lost"].append(s)
        out["lost"] += [s for s in on_disk if s not in listed and s not in out["lost"]]
        for s in listed:
            try:
                out["wrong"] += sw.differences(mngr.restore(s), s)
                if mngr.metrics(s) != sw.metrics_of(s):
                    out["wrong"].append(f"step {s}: metrics {mngr.metrics(s)}")
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint is what we count
                out["wrong"].append(f"step {s}: {type(e).__name__}: {e}")
        step = (mngr.latest_step or 0) + 1
        mngr.save(step, sw.tree_of(step), metrics=sw.metrics_of(step))
        mngr.close()
        out["debris"] = problems(directory)
        index = json.loads(Path(directory, "checkpoint").read_text())
        indexed = [c["step"] for c in index["checkpoints"]]
        if indexed != mngr.steps:
            out["debris"].append(f"index lists {indexed}, committed {mngr.steps}")
    except Exception as e:  # noqa: BLE001 - reported as the trial's failure
        out["wrong"].append(f"the manager after the kill failed: {type(e).__name__}: {e}")
    out["listed"] = listed if "listed" in locals() else []
    return out


def schedule(kills: int, rng: random.Random) -> list[dict[str, Any]]:
    """Each trial's mode and aim: modes in turn, each mode's phases in turn (then "random"),
    each phase hit in turn exactly before it, at a random moment inside it, and exactly after
    it (a self-kill at a boundary), starting at a different one for each mode."""
    hows = ["at before", "inside", "at after"]
    per_mode: collections.Counter[str] = collections.Counter()
    out = []
    for i in range(kills):
        m = i % len(sw.MODES)
        mode = sw.MODES[m]
        aims = [*sw.phases_of(mode), "random"]
        j = per_mode[mode]
        per_mode[mode] += 1
        phase = aims[j % len(aims)]
        how = "inside" if phase == "random" else hows[(j // len(aims) + m) % len(hows)]
        out.append({"trial": i, "mode": mode, "phase": phase, "how": how, "fraction": rng.random()})
    return out


def kill_trials(kills: int, root: str, rng: random.Random, keep: str) -> list[dict[str, Any]]:
    results = []
    for t in schedule(kills, rng):
        directory = os.path.join(root, t["mode"])
        os.makedirs(directory, exist_ok=True)
        # The phase's 2nd occurrence: its 1st gives its duration. From the 2nd trial of a mode
        # on, its directory holds the checkpoints the trials before it left.
        exact = t["how"].startswith("at")
        worker = Worker(t["mode"], directory, f"{t['phase']}:2:{t['how'][3:]}" if exact else None)
        if not exact:
            worker.aim = (t["phase"], 2, t["fraction"])
        try:
            worker.wait(timeout=300)
            died = None
        except RuntimeError as e:  # a save that raised, say: the trial fails, the soak goes on
            died = str(e).splitlines()[0]
        t.update(landed=worker.landed(), committed=worker.committed())
        snapshot = os.path.join(keep, f"trial-{t['trial']}")
        shutil.copytree(directory, snapshot)
        t.update(check_after_kill(directory, t["committed"], plain=not t["mode"].startswith("m")))
        if died:
            t["wrong"].insert(0, died)
        t["ok"] = not (t["lost"] or t["wrong"] or t["debris"])
        if t["ok"]:
            shutil.rmtree(snapshot)
        else:
            t["kept"] = snapshot
            t["worker_log"] = worker.log()
        results.append(t)
        mark = "ok" if t["ok"] else "FAILED"
        print(
            f"  kill {t['trial']:3d} {t['mode']:13s} {t['phase']:9s} {t['how']:9s} "
            f"landed {t['landed']:22s} {mark}",
            flush=True,
        )
    return results


# ---------------------------------------------------------------------------- memory soak


def memory_soak(mode: str, saves: int, root: str, host_bytes: int, limits: Any) -> dict[str, Any]:
    """One memory run in a process of its own; ``limits``: the parsed command line's."""
    cmd = [sys.executable, str(HERE / "soak_worker.py"), "memory", mode, f"{root}/mem-{mode}"]
    e = env()
    if host_bytes:
        e["JAXCKPT_ASYNC_HOST_BYTES"] = str(host_bytes)
    else:
        e.pop("JAXCKPT_ASYNC_HOST_BYTES", None)
    proc = subprocess.run([*cmd, str(saves)], capture_output=True, text=True, env=e)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory soak ({mode}) failed:\n{proc.stdout}\n{proc.stderr}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    rss, fds, threads, in_flight = (list(c) for c in zip(*raw["samples"], strict=True))
    w = max(1, min(100, saves // 10))  # the window: 100 saves of 1,000

    def window(xs: list[int], lo: int, hi: int) -> dict[str, float]:
        part = xs[lo:hi]
        return {"median": statistics.median(part), "max": max(part)}

    out: dict[str, Any] = {"mode": mode, "saves": saves, "window": w}
    out["s_per_save"] = raw["seconds"] / saves
    out["host_bytes"] = host_bytes
    out["most_in_flight"] = max(in_flight)
    for name, xs in (("rss", rss), ("fds", fds), ("threads", threads)):
        out[name] = {
            "first": window(xs, 0, w),
            "warm": window(xs, w, 2 * w),
            "mid": window(xs, (saves - w) // 2, (saves + w) // 2),
            "last": window(xs, saves - w, saves),
        }
    out["closed"] = dict(zip(("rss", "fds", "threads"), raw["closed"], strict=True))
    r = out["rss"]
    failures = []
    for since, limit in (("warm", limits.rss_growth_mib), ("mid", limits.rss_settled_mib)):
        grew = max(r["last"][k] - r[since][k] for k in ("median", "max"))
        out[f"rss_growth_since_{since}"] = grew
        if grew > limit * MiB:
            failures.append(
                f"resident memory grew by {grew / MiB:.0f} MiB since the {since} window"
            )
    if out["fds"]["last"]["max"] > out["fds"]["warm"]["max"] + limits.fd_slack:
        failures.append("open files grew after warm-up")
    if out["closed"]["fds"] > out["fds"]["warm"]["max"]:
        failures.append("files left open after close()")
    if out["threads"]["last"]["max"] > out["threads"]["warm"]["max"] + limits.thread_slack:
        failures.append("threads grew after warm-up")
    if raw["wrong"] or raw["kept"] != list(range(saves - sw.KEEP + 1, saves + 1)):
        failures.append(f"kept {raw['kept']}, wrong {raw['wrong']}")
    if [n for n in raw["names"] if n not in KEPT_FILES and not n.startswith("ckpt-")]:
        failures.append(f"debris {raw['names']}")
    out["failures"] = failures
    # [rss, open files, threads, saves in flight] after every ``samples_every``-th save
    out["samples_every"] = every = max(1, saves // 100)
    out["samples"] = raw["samples"][every - 1 :: every]
    return out


# ---------------------------------------------------------------------------- summary


def place(landed: str) -> tuple[str, str]:
    """("before" | "in" | "after", phase) of a trial's ``landed``; a kill inside two phases at
    once (an async save's plan beside the write of the one before) counts in the later one."""
    where, phases = landed.split(" ", 1)
    order = [p for _, _, p in sw.PHASES]
    return where, max(phases.split("+"), key=lambda p: order.index(p) if p in order else -1)


def summary(trials: list[dict[str, Any]], mem: list[dict[str, Any]], seed: int) -> str:
    lines = [f"Kill -9 trials: {len(trials)} (seed {seed})", ""]
    lines.append(
        "| mode | trials | lost | wrong bytes | debris after next save | debris the kills left |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|")
    for mode in sw.MODES:
        ts = [t for t in trials if t["mode"] == mode]
        if ts:
            n = [sum(len(t[k]) for t in ts) for k in ("lost", "wrong", "debris", "left_by_kill")]
            lines.append(f"| {mode} | {len(ts)} | " + " | ".join(map(str, n)) + " |")
    lines += ["", "Where the kills landed: trials by phase of a save", ""]
    cols = ["before", "in", "after", *sw.MODES]
    lines.append("| phase | just before | inside | just after | " + " | ".join(sw.MODES) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    order = ["start", *(p for _, _, p in sw.PHASES), "save call"]
    counts = {p: collections.Counter() for p in order}
    for t in trials:
        where, phase = place(t["landed"])
        counts[phase][where] += 1
        counts[phase][t["mode"]] += 1
    for p in order:
        if counts[p]:
            name = {"start": "(process start)", "save call": "(between save calls)"}.get(p, p)
            lines.append(f"| {name} | " + " | ".join(str(counts[p][c]) for c in cols) + " |")
    lines += ["", "Manager saves with rotation (max_to_keep=3), one process:", ""]
    lines.append(
        "| saves | RSS MiB, median / max: first, after warm-up, middle, last | open files "
        "| threads "
        "| most in flight | s/save | ok |"
    )
    lines.append("|---|---|---|---|---:|---:|---|")
    for m in mem:
        r = m["rss"]
        rss = ", ".join(
            f"{r[k]['median'] / MiB:.0f} / {r[k]['max'] / MiB:.0f}"
            for k in ("first", "warm", "mid", "last")
        )
        fds = (
            f"{m['fds']['warm']['max']} -> {m['fds']['last']['max']} (closed {m['closed']['fds']})"
        )
        th = f"{m['threads']['warm']['max']} -> {m['threads']['last']['max']}"
        ok = "yes" if not m["failures"] else "NO: " + "; ".join(m["failures"])
        lines.append(
            f"| {m['saves']} {m['mode']} | {rss} | {fds} | {th} | {m['most_in_flight']} "
            f"| {m['s_per_save']:.3f} | {ok} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100, help="kill trials (default 100)")
    ap.add_argument("--saves", type=int, default=1000, help="saves of each memory run")
    ap.add_argument("--memory-modes", default="async,sync", help="memory runs: async,sync")
    ap.add_argument(
        "--host-mib", type=int, default=HOST_MIB, help="JAXCKPT_ASYNC_HOST_BYTES (0: the default)"
    )
    ap.add_argument("--rss-growth-mib", type=int, default=RSS_GROWTH_MIB)
    ap.add_argument("--rss-settled-mib", type=int, default=RSS_SETTLED_MIB)
    ap.add_argument("--fd-slack", type=int, default=FD_SLACK)
    ap.add_argument("--thread-slack", type=int, default=THREAD_SLACK)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default=None, help="where to save (default: a temporary directory)")
    day = datetime.date.today().isoformat()
    ap.add_argument("--json", default=str(HERE / "results" / f"soak-{day}.json"))
    args = ap.parse_args()
    seed = random.randrange(2**32) if args.seed is None else args.seed
    root = tempfile.mkdtemp(prefix="jaxckpt-soak-", dir=args.dir)
    keep = tempfile.mkdtemp(prefix="jaxckpt-soak-failed-", dir=args.dir)
    start = time.monotonic()
    print(f"soak in {root} (seed {seed})", flush=True)
    trials = kill_trials(args.kills, root, random.Random(seed), keep)
    mem = []
    for mode in [m for m in args.memory_modes.split(",") if m]:
        print(f"  {args.saves} manager saves ({mode}) ...", flush=True)
        mem.append(memory_soak(mode, args.saves, root, args.host_mib * MiB, args))
    shutil.rmtree(root, ignore_errors=True)
    failed = [t for t in trials if not t["ok"]] + [m for m in mem if m["failures"]]
    if not any(not t["ok"] for t in trials):
        os.rmdir(keep)
    text = summary(trials, mem, seed)
    print("\n" + text)
    for t in trials:
        if not t["ok"]:
            print(
                f"\nFAILED trial {t['trial']} ({t['mode']}, {t['phase']}, {t['how']}, landed "
                f"{t['landed']}): lost {t['lost']}, wrong {t['wrong']}, debris {t['debris']}; "
                f"the directory as the kill left it: {t['kept']}\n{t['worker_log']}"
            )
    doc = {
        "date": day,
        "command": " ".join(["python", *sys.argv]),
        "seed": seed,
        "seconds": time.monotonic() - start,
        "summary": text,
        "kills": trials,
        "memory": mem,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1))
    print(f"\n{len(failed)} failures; {time.monotonic() - start:.0f} s; JSON: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
