"""jaxckpt against Orbax, Flax msgpack and the raw disk, side by side on the same in-memory tree.

Usage (``make bench`` runs the first)::

    python benchmarks/bench.py                      # W1 + W2 at the issue's sizes, 3 repeats
    python benchmarks/bench.py --scale 0.1 -r 1     # smaller trees while iterating
    python benchmarks/bench.py --workloads W3       # 8 GiB on the first accelerator (GPU)
    python benchmarks/bench.py --workloads W4       # a fine-tune's incremental saves (w4.py)
    python benchmarks/bench.py --workloads W5       # 4 processes, a replicated 256 MiB tree
    python benchmarks/bench.py --workloads ST       # a 1 GiB safetensors file restored
    python benchmarks/bench.py --workloads W6       # a 4-process job's local tier

Workloads: W1 a transformer-like float32 tree (~100 arrays nested 3 deep) with its optax.adam
state, ~1 GiB in all; W2 10,000 float32 arrays of 1-64 KiB (~0.3 GiB) in nested dicts; W3
8 GiB of arrays on the device, then again with the device's memory nearly full (no room for a
device copy); W4 a fine-tune (1 GiB frozen, 16 MiB trained with Adam) whose
manager saves every step (benchmarks/w4.py); W5 4 processes on 127.0.0.1 (1 CPU device each)
saving and restoring a fully replicated 256 MiB tree, replicas sharing the work or not; ST W1's
parameters (3x wider, ~1 GiB) in one safetensors file, restored into jax.Arrays by jaxckpt and
by ``safetensors.flax.load_file``; W6 a job of 4 processes on this machine, 256 MiB of state each,
saving to a manager's local tier (one peer replica) and to its persistent tier, and restoring
after losing a host (benchmarks/pod_worker.py). ``--scale`` multiplies the bytes (W1, W3, W4,
W6) or the leaf count (W2).
Prints a table (medians, min-max, GiB/s, ratio jaxckpt / best peer), checks the issue's floors
and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxckpt as jc

PEERS = ("orbax", "orbax_mgr", "flax_msgpack")
GiB = 1 << 30
T0 = time.perf_counter()


# ---------------------------------------------------------------------------- workloads


def make_w1(scale: float) -> Any:
    import optax

    d = max(8, int(1024 * math.sqrt(scale)) // 8 * 8)
    vocab, layers = 8 * d, 7 if scale >= 0.01 else 1  # tiny runs (the smoke test): few leaves
    rng = np.random.default_rng(0)

    def w(*shape: int) -> jax.Array:
        return jax.device_put(rng.standard_normal(shape, dtype=np.float32))

    params: dict[str, Any] = {
        "embed": {"table": w(vocab, d)},
        "final_ln": {"scale": w(d), "bias": w(d)},
    }
    for i in range(layers):
        params[f"layer_{i}"] = {
            "attn": {"q": w(d, d), "k": w(d, d), "v": w(d, d), "o": w(d, d)},
            "mlp": {"w1": w(d, 4 * d), "b1": w(4 * d), "w2": w(4 * d, d), "b2": w(d)},
            "ln1": {"scale": w(d), "bias": w(d)},
            "ln2": {"scale": w(d), "bias": w(d)},
        }
    return {"params": params, "opt_state": optax.adam(1e-3).init(params)}


def make_w2(scale: float) -> Any:
    n = max(10, int(10_000 * scale))
    rng = np.random.default_rng(0)
    sizes = rng.integers(256, 16 * 1024 + 1, size=n)  # float32 elements: 1-64 KiB
    tree: dict[str, Any] = {}
    for i, s in enumerate(sizes):
        group = tree.setdefault(f"block_{i // 100}", {}).setdefault(f"sub_{i // 10 % 10}", {})
        group[f"w{i}"] = jax.device_put(rng.standard_normal(int(s), dtype=np.float32))
    return tree


def make_w3(scale: float) -> Any:
    n = 32
    per = max(1024, int(8 * GiB * scale) // n // 4)
    dev = jax.devices()[0]
    key = jax.random.PRNGKey(0)
    tree: dict[str, Any] = {}
    for i in range(n):
        x = jax.random.normal(jax.random.fold_in(key, i), (per,))
        tree.setdefault(f"layer_{i // 4}", {})[f"w{i}"] = jax.device_put(x, dev)
    return tree


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    return [
        (jax.tree_util.keystr(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )


def subtree_of(tree: Any, keypath: tuple[Any, ...], leaf: Any) -> Any:
    """A tree holding only the leaf at ``keypath`` (dict keys and named-tuple fields)."""
    if not keypath:
        return leaf
    return {keypath[0].key: subtree_of(None, keypath[1:], leaf)}


def pick(tree: Any, keypath: tuple[Any, ...]) -> Any:
    for k in keypath:
        tree = tree[k.key]
    return tree


# ---------------------------------------------------------------------------- measuring


DROP = True  # --no-drop turns it off (the smoke test: other tests run beside it)


def drop_caches(warm: str | None = None) -> bool:
    """Empties the page cache (and the kernel's directory and inode caches), then looks up
    ``warm`` again: the directory holding the checkpoints. A cold restore then reads each
    checkpoint's own directories and files from the disk, but not the path down to them, whose
    cold lookups (about 1 ms per level here) would make a figure depend on how deep ``--dir``
    lies (W2's partial restore: 6-7 ms with it looked up, 10 ms without)."""
    if not DROP:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    if warm is not None:
        os.stat(warm)
    quiet_disk(warm or ".")
    return True


def idle_disk(path: str) -> None:
    """Before a timed save without a cache drop: earlier writes synced, the disk quiet."""
    if DROP:
        os.sync()
        quiet_disk(path)


def quiet_disk(path: str, window: float = 0.5, busy_ms: int = 10, limit: float = 60.0) -> float:
    """Waits until the disk holding ``path`` was busy under ``busy_ms`` in the last ``window``
    seconds (its ``io_ticks`` in /proc/diskstats), for at most ``limit`` s; returns the wait.

    ``sync`` returns once the data is written, but the disk may still be busy with other work
    (writeback the sync did not wait for; this VM's disk is mounted with ``discard``). Every
    timed operation of every tool then starts on an idle disk; the run says when it waited."""
    st = os.stat(path)
    dev = [str(os.major(st.st_dev)), str(os.minor(st.st_dev))]

    def ticks() -> int | None:
        with open("/proc/diskstats") as f:
            for fields in map(str.split, f):
                if fields[:2] == dev:
                    return int(fields[12])
        return None

    t0 = time.monotonic()
    last = ticks()
    while last is not None and time.monotonic() - t0 < limit:
        time.sleep(window)
        now = ticks()
        if now is None or now - last < busy_ms:
            break
        last = now
    waited = time.monotonic() - t0
    if waited > 2 * window + 0.5:
        print(f"  (waited {waited:.1f} s for the disk to go quiet)", flush=True)
    return waited


def fsync_tree(path: str) -> None:
    """Makes every file and directory under ``path`` durable (for tools that do not fsync)."""
    for d, _, files in os.walk(path):
        for name in [*files, "."]:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_files(path: str) -> int:
    """Reads every file under ``path`` on 16 threads (as jaxckpt's I/O threads do), unparsed:
    the bytes read."""

    def read(name: str) -> int:
        with open(name, "rb", buffering=0) as f:
            return len(f.read())

    names = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return sum(pool.map(read, names))


def file_count(path: str) -> int:
    if os.path.isfile(path):
        return 1
    return sum(len(files) for _, _, files in os.walk(path))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class PeakRSS:
    """Samples the resident set every 2 ms; ``extra`` is the peak above the start."""

    def __enter__(self) -> PeakRSS:
        gc.collect()  # JAX frees arrays that adopted host buffers at garbage collection
        _malloc_trim()  # freed heap memory back to the OS: else later growth hides in it
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.start


# This VM charges ~2-5 s/GiB the first time memory is touched, and memory freed to the OS
# counts as untouched again a few seconds later (virtio-balloon free page reporting). So the
# benchmark keeps what it frees: glibc's malloc then serves every tool from memory touched
# once (touch_memory), never from the OS, and no tool pays that charge inside a timing.
KEEP_MEMORY = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=" + str(
    1 << 60
)


def keep_memory() -> None:
    """Re-runs this script with ``KEEP_MEMORY`` in effect (glibc reads it at start-up only)."""
    if platform.libc_ver()[0] != "glibc" or KEEP_MEMORY in os.environ.get("GLIBC_TUNABLES", ""):
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), KEEP_MEMORY]))
    env = {**os.environ, "GLIBC_TUNABLES": tunables}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def touch_memory(nbytes: int) -> None:
    """Touches ``nbytes`` once, then frees them into the heap that every later run reuses."""
    buf = np.ones(nbytes // 8 + 1, np.float64)
    buf[::512] = 2
    del buf


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


# ---------------------------------------------------------------------------- tools


class Tool:
    name = ""
    ops: tuple[str, ...] = ("save", "restore_warm", "restore_cold", "partial_cold")

    def __init__(self, work: str):
        self.work = work

    # Subclasses define save(path, tree), and for the ops they run restore(path, tree) and
    # partial(path, tree, keypath, leaf).


class Jaxckpt(Tool):
    name = "jaxckpt"

    def save(self, path: str, tree: Any) -> None:
        jc.save(path, tree)

    def restore(self, path: str, tree: Any) -> Any:
        # The live tree as the target, as docs/api.md shows and as Flax msgpack's from_bytes
        # takes it: building a ShapeDtypeStruct per leaf first is the caller's choice, not
        # part of a restore (Orbax's restore below takes the abstract tree its docs ask for).
        return block(jc.restore(path, tree))

    def partial(self, path: str, tree: Any, keypath: tuple[Any, ...], leaf: Any) -> Any:
        return pick(
            block(jc.restore(path, subtree_of(tree, keypath, abstract(leaf)), partial=True)),
            keypath,
        )


class Orbax(Tool):
    name = "orbax"

    def __init__(self, work: str):
        super().__init__(work)
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.ckptr = ocp.StandardCheckpointer()

    def save(self, path: str, tree: Any) -> None:
        self.ckptr.save(path, tree)
        self.ckptr.wait_until_finished()
        fsync_tree(path)

    def restore(self, path: str, tree: Any) -> Any:
        return block(self.ckptr.restore(path, abstract(tree)))

    def partial(self, path: str, tree: Any, keypath: tuple[Any, ...], leaf: Any) -> Any:
        ocp = self.ocp
        item = subtree_of(tree, keypath, abstract(leaf))
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as c:
            return pick(block(c.restore(path, args=args)), keypath)

    def close(self) -> None:
        self.ckptr.close()


class JaxckptOnOrbax(Orbax):
    """An Orbax checkpoint (saved by Orbax's StandardCheckpointer, as ``orbax``) restored by
    jaxckpt directly (docs/interop.md): set against ``orbax``'s own restore of it."""

    name = "jaxckpt_orbax"

    def restore(self, path: str, tree: Any) -> Any:
        return block(jc.restore(path, abstract(tree)))

    def partial(self, path: str, tree: Any, keypath: tuple[Any, ...], leaf: Any) -> Any:
        return pick(
            block(jc.restore(path, subtree_of(tree, keypath, abstract(leaf)), partial=True)),
            keypath,
        )


class OrbaxManager(Tool):
    name = "orbax_mgr"
    ops = ("save",)

    def save(self, path: str, tree: Any) -> None:
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(path) as mngr:
            mngr.save(0, args=ocp.args.StandardSave(tree))
            mngr.wait_until_finished()
        fsync_tree(path)


class FlaxMsgpack(Tool):
    name = "flax_msgpack"

    def save(self, path: str, tree: Any) -> None:
        from flax import serialization

        with open(path, "wb") as f:
            f.write(serialization.to_bytes(tree))
            f.flush()
            os.fsync(f.fileno())

    def restore(self, path: str, tree: Any) -> Any:
        from flax import serialization

        with open(path, "rb") as f:
            return block(jax.device_put(serialization.from_bytes(tree, f.read())))

    def partial(self, path: str, tree: Any, keypath: tuple[Any, ...], leaf: Any) -> Any:
        return pick(self.restore(path, tree), keypath)  # msgpack cannot read part of a file


class Raw(Tool):
    """NumPy ``tofile`` / ``fromfile``, one file per leaf, fsynced: the disk's own speed."""

    name = "raw"

    def save(self, path: str, tree: Any) -> None:
        os.makedirs(path)
        for i, (_, x) in enumerate(leaves_with_paths(tree)):
            with open(os.path.join(path, str(i)), "wb") as f:
                np.asarray(x).tofile(f)
                f.flush()
                os.fsync(f.fileno())
        fsync_tree(path)

    def restore(self, path: str, tree: Any) -> Any:  # into NumPy: the disk-bound floor
        return [
            np.fromfile(os.path.join(path, str(i)), dtype=x.dtype).reshape(x.shape)
            for i, (_, x) in enumerate(leaves_with_paths(tree))
        ]

    def partial(self, path: str, tree: Any, keypath: tuple[Any, ...], leaf: Any) -> Any:
        i = [kp for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]].index(keypath)
        return np.fromfile(os.path.join(path, str(i)), dtype=leaf.dtype).reshape(leaf.shape)


TOOLS: dict[str, type[Tool]] = {
    t.name: t for t in (Jaxckpt, Orbax, JaxckptOnOrbax, OrbaxManager, FlaxMsgpack, Raw)
}


# ---------------------------------------------------------------------------- runs


class Results:
    def __init__(self) -> None:
        self.times: dict[tuple[str, str, str], list[float]] = {}
        self.notes: dict[str, Any] = {}

    def add(self, wl: str, op: str, tool: str, value: float) -> None:
        self.times.setdefault((wl, op, tool), []).append(value)
        if op in SECONDS or op.startswith(("partial", "async", "mgr")):  # progress, as measured
            print(f"    {wl} {op} {tool}: {value:.4f} s", flush=True)

    def median(self, wl: str, op: str, tool: str) -> float | None:
        v = self.times.get((wl, op, tool))
        return statistics.median(v) if v else None


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    # Results dropped before this call are freed first, so no tool is charged for freeing an
    # earlier one: JAX frees arrays that adopted host buffers at the next garbage collection
    # (its gc callback), which otherwise lands inside whatever runs next (~25-40 ms for W1).
    gc.collect()
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def run_workload(
    wl: str, tree: Any, tools: list[Tool], res: Results, args: argparse.Namespace
) -> None:
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    part_bytes = 1024 if wl == "W2" else 4 << 20
    dict_only = [kv for kv in flat if all(isinstance(k, jax.tree_util.DictKey) for k in kv[0])]
    keypath, leaf = min(dict_only, key=lambda kv: abs(kv[1].nbytes - part_bytes))
    res.notes[wl] = {
        "bytes": size,
        "leaves": len(flat),
        "partial_leaf": jax.tree_util.keystr(keypath),
        "partial_bytes": int(leaf.nbytes),
    }
    print(
        f"\n{wl}: {size / GiB:.3f} GiB in {len(flat)} arrays; partial restore of "
        f"{jax.tree_util.keystr(keypath)} ({leaf.nbytes} bytes)",
        flush=True,
    )
    base = os.path.join(args.dir, wl)
    scratch = Scratch(keep_all=size * 30 * args.repeats < shutil.disk_usage(args.dir).free // 2)
    for rep in range(args.repeats):
        if DROP:  # a real disk being measured, not the smoke test
            settle()
        # Each tool goes first in one repeat: whatever the first operation of a repeat pays
        # (after settle's idle minute: jaxckpt's W1 save 1.2-2.1 s there, its async save in
        # the same repeat 0.7-0.8 s) then lands in one sample of each tool, not its median.
        for tool in tools[rep % len(tools) :] + tools[: rep % len(tools)]:
            path = os.path.join(base, f"{tool.name}-{rep}")
            remove(path)
            os.makedirs(base, exist_ok=True)
            drop_caches(base)
            dt, _ = timed(tool.save, path, tree)
            res.add(wl, "save", tool.name, dt)
            res.add(wl, "files", tool.name, file_count(path))
            if "restore_warm" in tool.ops:
                tool.restore(path, tree)  # warm the page cache
                dt, out = timed(tool.restore, path, tree)
                del out
                res.add(wl, "restore_warm", tool.name, dt)
                drop_caches(base)
                dt, out = timed(tool.restore, path, tree)
                del out
                res.add(wl, "restore_cold", tool.name, dt)
                if tool.name == "jaxckpt" and DROP:
                    # The disk alone: every file of the checkpoint read cold, nothing parsed.
                    drop_caches(base)
                    res.add(wl, "restore_cold", "disk_read", timed(read_files, path)[0])
                drop_caches(base)
                dt, out = timed(tool.partial, path, tree, keypath, leaf)
                np.testing.assert_array_equal(np.asarray(out), np.asarray(leaf))
                del out
                res.add(wl, "partial_cold", tool.name, dt)
            scratch.drop(path)
            print(
                f"  rep {rep} {tool.name:<13} done at {time.perf_counter() - T0:.1f} s, "
                f"RSS {rss() / GiB:.2f} GiB",
                flush=True,
            )
        async_and_manager(wl, tree, tools, res, args, base, rep, scratch)
        if not scratch.keep_all:
            scratch.flush()
    scratch.flush()
    if wl == "W3" and any(t.name == "jaxckpt" for t in tools):
        device_full(tree, res, args, base)
    memory_use(wl, tree, tools, res, base)
    shutil.rmtree(base, ignore_errors=True)


class Scratch:
    """The benchmark's checkpoints, deleted in batches: after the workload when the disk has
    room for all of them, else after each repeat. On ext4 without a journal (this VM's disk),
    creating a file scans past every inode deleted in the last 60 s (360 s while its inode
    table block is dirty), so deleting one tool's checkpoint just before the next tool saves
    charges the next tool for it: 1,100 empty files took 0.4 s to create on a quiet disk and
    2-5 s after deletes (perf: ``recently_deleted`` in ``ext4_create``/``ext4_mkdir``). Each
    repeat then starts once the deletions are a minute old (:func:`settle`)."""

    def __init__(self, keep_all: bool):
        self.keep_all = keep_all
        self.pending: list[str] = []

    def drop(self, path: str) -> None:
        self.pending.append(path)

    def flush(self) -> None:
        for path in self.pending:
            remove(path)
        self.pending.clear()


def remove(path: str) -> None:
    """Removes a checkpoint: a directory, or a file (Flax msgpack)."""
    global LAST_DELETE
    if os.path.lexists(path):
        LAST_DELETE = time.monotonic()
    shutil.rmtree(path, ignore_errors=True)
    if os.path.isfile(path):
        os.remove(path)


LAST_DELETE = -1e9  # when remove() last deleted something (time.monotonic())
RECENT = 61.0  # s: ext4 without a journal skips inodes deleted this recently (60 s, clean)


def settle() -> None:
    """Waits until no deleted inode is recent to ext4 (see ``Scratch``), so that no tool's save
    is charged for the deletions of the checkpoints before it. After a ``sync`` the inode
    table is clean and ext4's window is 60 s (360 s while dirty)."""
    left = LAST_DELETE + RECENT - time.monotonic()
    if left > 0:
        os.sync()
        print(f"  (waiting {left:.0f} s after deleting checkpoints)", flush=True)
        time.sleep(left)


def memory_use(wl: str, tree: Any, tools: list[Tool], res: Results, base: str) -> None:
    """Peak extra host RAM of one save and one restore per tool, untimed and after every
    timed run: measuring it returns freed memory to the OS (malloc_trim), which this VM then
    charges for again at the next touch."""
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    for tool in tools:
        path = os.path.join(base, f"{tool.name}-ram")
        with PeakRSS() as mem:
            tool.save(path, tree)
        res.add(wl, "save_extra_ram_x", tool.name, mem.extra / size)
        if "restore_warm" in tool.ops:  # no warm-up: JAX frees its result later, at unknown times
            with PeakRSS() as mem:
                out = tool.restore(path, tree)
            del out
            res.add(wl, "restore_extra_ram_x", tool.name, mem.extra / size)
        remove(path)


def async_and_manager(
    wl: str,
    tree: Any,
    tools: list[Tool],
    res: Results,
    args: argparse.Namespace,
    base: str,
    rep: int,
    scratch: Scratch,
) -> None:
    names = {t.name for t in tools}
    leaves = jax.tree_util.tree_leaves(tree)
    # W1's async blocking times are small and noisy (0.065-0.398 s in one run) and a floor
    # sets the manager's calls against their median: three samples per repeat, not one. W2
    # and W3 take one (Orbax's async save of W2 takes ~35 s to finish; W3 is on a GPU lease).
    for k in range(3 if wl == "W1" else 1):
        dt, copies = timed(lambda: [np.copy(np.asarray(x)) for x in leaves])
        del copies
        res.add(wl, "async_block", "np.copy", dt)
        if "jaxckpt" in names:
            path = os.path.join(base, f"async-jaxckpt-{rep}-{k}")
            idle_disk(base)
            gc.collect()  # as in timed()
            t0 = time.perf_counter()
            h = jc.save_async(path, tree)
            res.add(wl, "async_block", "jaxckpt", time.perf_counter() - t0)
            h.wait()
            res.add(wl, "async_total", "jaxckpt", time.perf_counter() - t0)
            scratch.drop(path)
        if "orbax" in names:
            import orbax.checkpoint as ocp

            path = os.path.join(base, f"async-orbax-{rep}-{k}")
            idle_disk(base)
            with ocp.StandardCheckpointer() as ckptr:
                gc.collect()  # as in timed()
                t0 = time.perf_counter()
                ckptr.save(path, tree)
                res.add(wl, "async_block", "orbax", time.perf_counter() - t0)
                ckptr.wait_until_finished()
                fsync_tree(path)
                res.add(wl, "async_total", "orbax", time.perf_counter() - t0)
            scratch.drop(path)
    if args.steps <= 0 or wl == "W3":
        return
    for i, compute in enumerate((0.0, args.compute)):
        op = f"mgr_block_{compute:g}s"
        if "jaxckpt" in names:
            d = os.path.join(base, f"mgr-jaxckpt-{rep}-{i}")
            idle_disk(base)
            for t in manager_loop_jaxckpt(d, tree, args.steps, compute):
                res.add(wl, op, "jaxckpt", t)
            scratch.drop(d)
        if "orbax" in names:
            d = os.path.join(base, f"mgr-orbax-{rep}-{i}")
            idle_disk(base)
            for t in manager_loop_orbax(d, tree, args.steps, compute):
                res.add(wl, op, "orbax_mgr", t)
            scratch.drop(d)


def fill_device(tree: Any) -> list[jax.Array]:
    """Arrays filling the tree's device until less than half the tree's size is free (no
    room for a device copy of it); none where the device reports no memory statistics."""
    leaves = jax.tree_util.tree_leaves(tree)
    dev = next(iter(leaves[0].devices()))
    size = sum(x.nbytes for x in leaves)
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        stats = {}
    if "bytes_limit" not in stats:
        return []
    fill = stats["bytes_limit"] - stats.get("bytes_in_use", 0) - size // 2
    out = []
    while fill > 0:
        n = min(fill, GiB)
        out.append(jax.block_until_ready(jnp.zeros((n,), jnp.uint8, device=dev)))
        fill -= n
    return out


def d2h_pinned(leaves: list[Any]) -> float:
    """One transfer of every leaf into pinned host memory (all queued, then waited for)."""
    gc.collect()
    t0 = time.perf_counter()
    out = block(
        jax.device_put(leaves, [x.sharding.with_memory_kind("pinned_host") for x in leaves])
    )
    dt = time.perf_counter() - t0
    del out
    return dt


def device_full(tree: Any, res: Results, args: argparse.Namespace, base: str) -> None:
    """W3 with the device's memory nearly full (issue #18, part 4): no room for device copies,
    so an async save's snapshot is the transfer to host memory. The floor is one transfer of
    every leaf into pinned host memory that JAX's allocator already holds (the second one:
    the first pays for pinning it); the manager's calls, with compute between saves longer
    than a save's write, against the same."""
    filler = fill_device(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    print(f"  device full: {len(filler)} GiB of filler on the device", flush=True)
    try:
        d2h_pinned(leaves)  # pins the memory
        for _ in range(args.repeats):
            res.add("W3", "d2h_pinned", "reference", d2h_pinned(leaves))
        totals = []
        for k in range(args.repeats + 1):
            path = os.path.join(base, f"full-async-{k}")
            idle_disk(base)
            gc.collect()
            t0 = time.perf_counter()
            h = jc.save_async(path, tree)
            dt = time.perf_counter() - t0
            h.wait()
            totals.append(time.perf_counter() - t0)
            # the first save of a process pins its host memory
            res.add("W3", "async_block_full_first" if k == 0 else "async_block_full", "jaxckpt", dt)
            remove(path)
        if args.steps > 0:
            compute = max(args.compute, 1.5 * statistics.median(totals))
            res.notes["W3"]["full_compute_s"] = compute
            d = os.path.join(base, "full-mgr")
            idle_disk(base)
            for t in manager_loop_jaxckpt(d, tree, args.steps, compute):
                res.add("W3", "mgr_block_full", "jaxckpt", t)
            remove(d)
    finally:
        del filler


def manager_loop_jaxckpt(d: str, tree: Any, steps: int, compute: float) -> list[float]:
    """Saves every step; ``jc.CheckpointManager`` when present, else save_async directly."""
    out = []
    if hasattr(jc, "CheckpointManager"):
        with jc.CheckpointManager(d) as mngr:
            for step in range(steps):
                time.sleep(compute)
                dt, _ = timed(lambda s=step: mngr.save(s, tree))
                out.append(dt)
            mngr.wait_until_finished()
        return out
    handles = []
    for step in range(steps):
        time.sleep(compute)
        dt, h = timed(lambda s=step: jc.save_async(os.path.join(d, f"ckpt-{s}"), tree, step=s))
        handles.append(h)
        out.append(dt)
    for h in handles:
        h.wait()
    return out


def manager_loop_orbax(d: str, tree: Any, steps: int, compute: float) -> list[float]:
    import orbax.checkpoint as ocp

    out = []
    with ocp.CheckpointManager(d) as mngr:
        for step in range(steps):
            time.sleep(compute)
            dt, _ = timed(lambda s=step: mngr.save(s, args=ocp.args.StandardSave(tree)))
            out.append(dt)
        mngr.wait_until_finished()
    return out


# ---------------------------------------------------------------------------- report

OPS = [
    "save",
    "restore_warm",
    "restore_cold",
    "partial_cold",
    "async_block",
    "async_total",
    "mgr_block_0s",
    "mgr_block_1s",
    "save_extra_ram_x",
    "restore_extra_ram_x",
    "files",
]
SECONDS = {"save", "restore_warm", "restore_cold", "async_total"}


def run_pod(args: argparse.Namespace, res: Results, n: int = 4) -> None:
    """W6: ``n`` processes of benchmarks/pod_worker.py joined on 127.0.0.1; each figure is the
    slowest process's (the job waits for it)."""
    import socket
    import subprocess

    mib = 256 * args.scale
    directory = os.path.join(args.dir, "W6")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pod_worker.py")
    argv = [str(n), str(port), directory, str(mib), str(args.repeats)]
    print(f"W6: {n} processes, {mib:.0f} MiB each, {args.repeats} repeats", flush=True)
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode:
            raise RuntimeError(f"W6 process {i} failed:\n{out[-3000:]}")
    per: dict[tuple[str, str], list[list[float]]] = {}
    for out in outs:
        mine: dict[tuple[str, str], list[float]] = {}
        for line in out.splitlines():
            if line.startswith("POD "):
                r = json.loads(line[4:])
                mine.setdefault((r["op"], r["tool"]), []).append(r["seconds"])
        for k, v in mine.items():
            per.setdefault(k, []).append(v)
    res.notes["W6"] = {"bytes": int(mib * (1 << 20) * n), "processes": n}
    for (op, tool), by_process in per.items():
        for values in zip(*by_process, strict=True):
            res.add("W6", op, tool, max(values))
    shutil.rmtree(directory, ignore_errors=True)


def table(res: Results) -> str:
    head = f"| {'workload':<4} | {'operation':<19} | {'tool':<12} | {'median':>9} | {'min-max':>17} | {'GiB/s':>6} | {'jaxckpt/best peer':>17} |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for wl in dict.fromkeys(k[0] for k in res.times):
        size = res.notes[wl]["bytes"]
        for op in [o for o in OPS if any(k[:2] == (wl, o) for k in res.times)] + sorted(
            {k[1] for k in res.times if k[0] == wl} - set(OPS)
        ):
            tools = [k[2] for k in res.times if k[:2] == (wl, op)]
            peers = [res.median(wl, op, t) for t in tools if t in PEERS]
            best = min(peers) if peers else None
            for t in tools:
                v = res.times[(wl, op, t)]
                med = statistics.median(v)
                unit = "" if op == "files" or op.endswith("_x") else " s"
                fmt = (lambda x: f"{x:.0f}") if op == "files" else (lambda x: f"{x:.3f}")
                gibs = f"{size / GiB / med:.2f}" if op in SECONDS and med > 0 else ""
                ratio = f"{med / best:.3f}" if t == "jaxckpt" and best else ""
                lines.append(
                    f"| {wl:<8} | {op:<19} | {t:<12} | {fmt(med) + unit:>9} | "
                    f"{fmt(min(v)) + '-' + fmt(max(v)):>17} | {gibs:>6} | {ratio:>17} |"
                )
    return "\n".join(lines)


def floors(res: Results) -> list[tuple[str, bool | None, str]]:
    """The issue's floors: (description, held?, the figures)."""
    m = res.median
    out: list[tuple[str, bool | None, str]] = []

    def check(desc: str, mine: float | None, bound: float | None, what: str) -> None:
        if mine is None or bound is None:
            out.append((desc, None, "not measured"))
        else:
            out.append((desc, mine <= bound, f"{mine:.4f} vs bound {bound:.4f} ({what})"))

    def times(x: float | None, k: float) -> float | None:
        return None if x is None else x * k

    check(
        "W1 save <= 1/2 Orbax",
        m("W1", "save", "jaxckpt"),
        times(m("W1", "save", "orbax"), 0.5),
        "s",
    )
    check(
        "W1 save <= 1.3x raw", m("W1", "save", "jaxckpt"), times(m("W1", "save", "raw"), 1.3), "s"
    )
    check(
        "W1 restore warm <= 1/2 Orbax",
        m("W1", "restore_warm", "jaxckpt"),
        times(m("W1", "restore_warm", "orbax"), 0.5),
        "s",
    )
    check(
        "W1 restore cold <= 3/4 Orbax",
        m("W1", "restore_cold", "jaxckpt"),
        times(m("W1", "restore_cold", "orbax"), 0.75),
        "s",
    )
    check(
        "W1 restore cold <= 1.3x raw",
        m("W1", "restore_cold", "jaxckpt"),
        times(m("W1", "restore_cold", "raw"), 1.3),
        "s",
    )
    check(
        "W1 partial cold <= 0.6x Orbax",
        m("W1", "partial_cold", "jaxckpt"),
        times(m("W1", "partial_cold", "orbax"), 0.6),
        "s",
    )
    check(
        "W1 async block <= 1.5x np.copy",
        m("W1", "async_block", "jaxckpt"),
        times(m("W1", "async_block", "np.copy"), 1.5),
        "s",
    )
    mgr = res.times.get(("W1", "mgr_block_1s", "jaxckpt"))
    check(
        "W1 manager (1 s compute) per call <= 2x async block",
        max(mgr) if mgr else None,
        times(m("W1", "async_block", "jaxckpt"), 2),
        "s, worst call",
    )
    check("W1 extra RAM sync save <= 0.25x", m("W1", "save_extra_ram_x", "jaxckpt"), 0.25, "x size")
    check("W1 extra RAM restore <= 1.1x", m("W1", "restore_extra_ram_x", "jaxckpt"), 1.1, "x size")
    check(
        "W2 save <= 1/10 Orbax",
        m("W2", "save", "jaxckpt"),
        times(m("W2", "save", "orbax"), 0.1),
        "s",
    )
    check(
        "W2 save < Flax msgpack", m("W2", "save", "jaxckpt"), m("W2", "save", "flax_msgpack"), "s"
    )
    check(
        "W2 restore warm <= 1/12 Orbax",
        m("W2", "restore_warm", "jaxckpt"),
        times(m("W2", "restore_warm", "orbax"), 1 / 12),
        "s",
    )
    check(
        "W2 restore cold <= 1/12 Orbax",
        m("W2", "restore_cold", "jaxckpt"),
        times(m("W2", "restore_cold", "orbax"), 1 / 12),
        "s",
    )
    # Issue 18, part 3: many small leaves against one copy of the tree and Flax msgpack.
    check(
        "W2 async block <= 2x np.copy",
        m("W2", "async_block", "jaxckpt"),
        times(m("W2", "async_block", "np.copy"), 2),
        "s",
    )
    disk = m("W2", "restore_cold", "disk_read")
    for op in ("restore_warm", "restore_cold"):
        bound = times(m("W2", op, "flax_msgpack"), 0.5)
        what = "s"
        if op == "restore_cold" and disk is not None:
            what = f"s; the disk alone reads the checkpoint's files in {disk:.4f} s"
            if bound is not None and disk > bound:
                what += ": more than the bound, which this disk cannot meet"
        check(f"W2 {op.replace('_', ' ')} <= 1/2 Flax msgpack", m("W2", op, "jaxckpt"), bound, what)
    check(
        "W2 restore cold <= 1.3x the disk alone",
        m("W2", "restore_cold", "jaxckpt"),
        times(disk, 1.3),
        "s",
    )
    check(
        "W2 partial cold <= 1/100 Orbax",
        m("W2", "partial_cold", "jaxckpt"),
        times(m("W2", "partial_cold", "orbax"), 0.01),
        "s",
    )
    for wl in ("W1", "W2"):  # issue 15: an Orbax checkpoint read by jaxckpt, no slower
        for op in ("restore_warm", "restore_cold"):
            check(
                f"{wl} {op.replace('_', ' ')} of an Orbax checkpoint by jaxckpt <= Orbax's own",
                m(wl, op, "jaxckpt_orbax"),
                m(wl, op, "orbax"),
                "s",
            )
    check(
        "W6 local save block <= persistent async block",
        m("W6", "async_block", "local+1 replica"),
        m("W6", "async_block", "persistent"),
        "s",
    )
    # The local tier in memory, as docs/multihost.md advises on a GPU host. On the persistent
    # tier's own disk both tiers read the same bytes from one disk (the survivor reads the lost
    # host's replica there too), so it cannot be 2x faster: shown, not bounded.
    same_disk = m("W6", "restore_lost_host", "local+1 replica")
    check(
        "W6 lost-host restore, local tier in /dev/shm <= 1/2 persistent",
        m("W6", "restore_lost_host", "local /dev/shm"),
        times(m("W6", "restore_lost_host", "persistent"), 0.5),
        "s; local tier on the same disk: "
        + ("not measured" if same_disk is None else f"{same_disk:.4f}")
        + ", not bounded",
    )
    # W3 (a GPU): the aims, from Orbax 0.12.4 on an H200, and Orbax in the same run.
    for desc, op, aim in (
        ("W3 async block <= 0.19 s and <= Orbax", "async_block", 0.19),
        ("W3 async save, durable <= 4.0 s and <= Orbax", "async_total", 4.0),
        ("W3 restore to the device <= 1.0 s and <= Orbax", "restore_warm", 1.0),
    ):
        peer = m("W3", op, "orbax")
        check(desc, m("W3", op, "jaxckpt"), None if peer is None else min(aim, peer), "s")
    # W5 (issue 18): replicas share the writing; the save against today's, in the same run.
    out.append(
        (
            "W5 largest share of the bytes written <= 0.3 (4 processes)",
            None
            if m("W5", "write_max_share_x", "jaxckpt") is None
            else m("W5", "write_max_share_x", "jaxckpt") <= 0.3,
            f"{m('W5', 'write_max_share_x', 'jaxckpt')} of the bytes",
        )
    )
    check("W5 save <= today's", m("W5", "save", "jaxckpt"), m("W5", "save", "unshared"), "s")
    import w4

    for desc, mine, bound, unit in w4.floors(res):
        check(desc, mine, bound, unit)
    # W3 with the device full (issue #18): no room for device copies.
    d2h = m("W3", "d2h_pinned", "reference")
    check(
        "W3 device full: async block <= d2h into pinned",
        m("W3", "async_block_full", "jaxckpt"),
        d2h,
        "s",
    )
    full = res.times.get(("W3", "mgr_block_full", "jaxckpt"))
    check(
        "W3 device full: manager per call <= 2x d2h into pinned",
        max(full) if full else None,
        times(d2h, 2),
        "s, worst call",
    )
    return [c for c in out if c[0].split()[0] in res.notes]  # the workloads run


def run_w5(res: Results, args: argparse.Namespace, processes: int = 4) -> None:
    """W5: ``processes`` JAX processes (benchmarks/replicas_worker.py) save a fully replicated
    tree with replicas sharing the writing and without (today's way), and restore it reading
    each part once and broadcasting it, and without; bytes and seconds per process."""
    import socket
    import subprocess

    mib = 256 * args.scale
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = os.path.join(args.dir, "W5")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replicas_worker.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "JAXCKPT_"))}
    print(f"\nW5: {processes} processes, a replicated tree of {mib:.1f} MiB", flush=True)
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(processes), str(port), base, str(mib)]
            + [str(args.repeats)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(processes)
    ]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("W5 failed:\n" + "\n".join(o[-2000:] for o in outs))
    rows = [
        json.loads(line.split(" ", 1)[1])
        for o in outs
        for line in o.splitlines()
        if line.startswith("W5RESULT ")
    ]
    res.notes["W5"] = {"bytes": int(mib * (1 << 20)), "processes": processes}
    tool = {"1": "jaxckpt", "0": "unshared"}
    for r in rows:
        if r["process"] == 0:  # the job's time: every process's ends at the closing barrier
            op = "save" if r["op"].startswith("save") else "restore_warm"
            res.add("W5", op, tool[r["op"][-1]], r["seconds"])
    for op in ("save_share1", "save_share0", "restore_bcast1", "restore_bcast0"):
        key = "wrote" if op.startswith("save") else "read"
        per = [0] * processes
        for r in rows:
            if r["op"] == op and r["rep"] == 0:
                per[r["process"]] = r[key]
        total = sum(per)
        res.notes["W5"][f"{op}_{key}_mib"] = [round(b / (1 << 20), 1) for b in per]
        name = f"{'write' if key == 'wrote' else 'read'}_max_share_x"
        if total:
            res.add("W5", name, tool[op[-1]], max(per) / total)
        print(f"    W5 {op}: MiB {key} per process {res.notes['W5'][f'{op}_{key}_mib']}")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    from importlib.metadata import version

    return (
        f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, tensorstore {version('tensorstore')}, "
        f"orbax-checkpoint {version('orbax-checkpoint')}, numpy {np.__version__}, "
        f"python {platform.python_version()}"
    )


def report(res: Results, args: argparse.Namespace, can_drop: bool) -> None:
    """Prints the table and the floors and writes the JSON (after every workload)."""
    print("\n" + table(res))
    checks = floors(res)
    print("\nFloors (issue #6):")
    for desc, ok, fig in checks:
        print(f"  {'PASS' if ok else 'FAIL' if ok is False else '----'}  {desc}: {fig}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "machine": machine(),
                "argv": sys.argv,
                "cold_dropped": can_drop,
                "workloads": res.notes,
                "times": [
                    {"workload": k[0], "op": k[1], "tool": k[2], "values": v}
                    for k, v in res.times.items()
                ],
                "floors": [{"floor": d, "held": ok, "figures": fig} for d, ok, fig in checks],
            },
            f,
            indent=1,
        )
    print(f"\nwrote {args.json}", flush=True)


def read_chars() -> int:
    """Bytes this process has read through system calls so far (``rchar`` of /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def safetensors_workload(args: argparse.Namespace, res: Results) -> None:
    """ST: a safetensors file restored into jax.Arrays, jaxckpt against the library's own
    ``safetensors.flax.load_file``; then the bytes one tensor's restore reads (``rchar``:
    read system calls only, so the library's memory-mapped reads do not show in it)."""
    import safetensors.flax

    params = block(make_w1(3 * args.scale)["params"])
    flat = {
        ".".join(k.key for k in kp): x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    size = sum(x.nbytes for x in flat.values())
    base = os.path.join(args.dir, "ST")
    os.makedirs(base, exist_ok=True)
    path = os.path.join(base, "model.safetensors")
    safetensors.flax.save_file(dict(flat), path)  # it turns the values into NumPy in place
    fsync_tree(base)
    name, leaf = min(flat.items(), key=lambda kv: abs(kv[1].nbytes - (4 << 20)))
    keypath = tuple(jax.tree_util.DictKey(k) for k in name.split("."))
    print(f"\nST: {size / GiB:.3f} GiB in {len(flat)} tensors; partial restore of {name}")
    res.notes["ST"] = {"bytes": size, "leaves": len(flat), "partial_leaf": name}
    target = abstract(params)

    def ours() -> Any:
        return block(jc.restore(path, target))

    def theirs() -> Any:
        return block(safetensors.flax.load_file(path))

    def ours_one() -> Any:
        return block(jc.restore(path, subtree_of(params, keypath, abstract(leaf)), partial=True))

    def theirs_one() -> Any:
        with safetensors.safe_open(path, framework="flax") as f:
            return block(f.get_tensor(name))

    for _ in range(args.repeats):
        for tool, whole, one in (("jaxckpt", ours, ours_one), ("safetensors", theirs, theirs_one)):
            whole()  # warm the page cache
            res.add("ST", "restore_warm", tool, timed(whole)[0])
            drop_caches(base)
            res.add("ST", "restore_cold", tool, timed(whole)[0])
            drop_caches(base)
            before = read_chars()
            res.add("ST", "partial_cold", tool, timed(one)[0])
            res.notes["ST"][f"partial_read_bytes_{tool}"] = read_chars() - before
    print(f"  one tensor of {leaf.nbytes} bytes read: {res.notes['ST']}", flush=True)
    shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workloads", default="W1,W2", help="comma-separated: W1, W2, W3, W4, W5, W6, ST"
    )
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ", ".join(TOOLS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the workload sizes")
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="saves per manager loop (0: skip)")
    ap.add_argument("--compute", type=float, default=1.0, help="simulated compute between saves, s")
    ap.add_argument("--dir", default="bench_out", help="scratch directory on the disk to measure")
    ap.add_argument("--json", default="bench_out/results.json")
    ap.add_argument("--no-drop", action="store_true", help="never drop the page cache")
    args = ap.parse_args(argv)
    global DROP
    DROP = not args.no_drop
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    can_drop = drop_caches()
    print(machine())
    kept = KEEP_MEMORY in os.environ.get("GLIBC_TUNABLES", "")
    print(
        "host memory: "
        + (
            "kept by the process once touched (GLIBC_TUNABLES), so timings pay no first touch"
            if kept
            else "returned to the OS when freed: timings may include this VM's first-touch cost"
        )
    )
    print(
        "cold page cache: "
        + (
            "dropped before each cold operation (root)"
            if can_drop
            else "NOT dropped (not root, or --no-drop): 'cold' figures are warm"
        ),
        flush=True,
    )
    res = Results()
    makers = {"W1": make_w1, "W2": make_w2, "W3": make_w3}
    for wl in args.workloads.split(","):
        if wl in ("W4", "W5", "W6", "ST"):  # their own loops (W4's in benchmarks/w4.py)
            if wl == "W4":
                import w4

                w4.run(sys.modules[__name__], args.scale, res, args)
            elif wl == "W6":
                run_pod(args, res)
            else:
                run_w5(res, args) if wl == "W5" else safetensors_workload(args, res)
            report(res, args, can_drop)
            continue
        names = args.tools.split(",")
        if wl == "W3":
            names = [n for n in names if n in ("jaxckpt", "orbax", "raw")]
        tree = block(makers[wl](args.scale))
        size = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
        # Enough for every tool's peak (Flax msgpack's save holds 3x more) and the heap's
        # fragmentation; W3's host copies go through JAX's pinned memory instead.
        touch_memory((3 if wl == "W3" else 6) * size)
        tools = [TOOLS[n](args.dir) for n in names]
        run_workload(wl, tree, tools, res, args)
        for t in tools:
            if hasattr(t, "close"):
                t.close()
        del tree
        report(res, args, can_drop)
    return 0


if __name__ == "__main__":
    keep_memory()
    sys.exit(main())
