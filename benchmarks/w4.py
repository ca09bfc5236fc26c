"""Workload W4 of bench.py: a fine-tune whose manager saves every step (incremental saves).

A frozen backbone (1 GiB x ``--scale``, 16 float32 arrays, the same ``jax.Array`` objects every
step) and a trainable head with adapters (16 MiB x ``--scale``) updated by ``optax.adam``
every step (so the head, the adapters and Adam's ``mu``/``nu`` change, 48 MiB x scale). Each
loop saves ``--steps`` + 1 steps through a manager and, per save after the first:

- ``w4_new_bytes_x``: bytes newly on disk (the run directory's usage, a hard-linked file
  counted once), over the bytes of the leaves that changed (jaxckpt incremental; the full
  save for reference);
- ``w4_durable``: from ``save`` until the checkpoint is durable (``save`` then
  ``wait_until_finished``): jaxckpt incremental (``jaxckpt``), ``incremental=False``
  (``jaxckpt_full``), Orbax's ``CheckpointManager`` (``orbax_mgr``, then fsynced);
- ``w4_restore_warm``/``w4_restore_cold``: restore of the last step, linked vs written in full;
- ``w4_fulltrain_durable``: the same loop with the backbone trained too (every leaf changes):
  incremental (hashing every chunk) vs ``incremental=False``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

import jaxckpt as jc

OPS = ("w4_new_bytes_x", "w4_durable", "w4_restore_warm", "w4_restore_cold", "w4_fulltrain_durable")


def make(scale: float) -> tuple[dict[str, Any], Any, Any]:
    """(state, the jitted training step, whether it trains the backbone too: a second step)."""
    import optax

    rng = np.random.default_rng(0)
    per = max(1024, int((1 << 30) * scale) // 16 // 4)  # float32 elements per backbone array
    backbone = {
        f"block_{i}": jax.device_put(rng.standard_normal(per, np.float32)) for i in range(16)
    }
    t = max(256, int((16 << 20) * scale) // 4)
    trainable = {
        "head": jax.device_put(rng.standard_normal(t // 2, np.float32)),
        "adapters": {
            f"lora_{i}": jax.device_put(rng.standard_normal(t // 16, np.float32)) for i in range(8)
        },
    }
    tx = optax.adam(1e-3)
    state = {"backbone": backbone, "trainable": trainable, "opt_state": tx.init(trainable)}

    @jax.jit
    def step(trainable: Any, opt_state: Any) -> tuple[Any, Any]:
        grads = jax.tree_util.tree_map(lambda p: 0.01 * p + 0.001, trainable)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(trainable, updates), opt_state

    @jax.jit
    def train_all(backbone: Any) -> Any:
        return jax.tree_util.tree_map(lambda p: p * 0.999 + 0.001, backbone)

    return state, step, train_all


def usage(d: str) -> int:
    """Bytes of the files under ``d``, each inode once (what ``du`` counts of hard links)."""
    seen: dict[tuple[int, int], int] = {}
    for root, _, files in os.walk(d):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def loop(
    b: Any, d: str, state: dict[str, Any], steps: int, kind: str, step_fn: Any, train_all: Any
) -> tuple[list[float], list[int], dict[str, Any]]:
    """Trains and saves ``steps`` + 1 times; returns the durable times and new bytes of the
    saves after the first, and the last state saved."""
    durable, new = [], []
    state = dict(state)
    if kind == "orbax_mgr":
        import orbax.checkpoint as ocp

        mngr: Any = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(max_to_keep=None))
    else:
        mngr = jc.CheckpointManager(d, max_to_keep=None, incremental=kind == "jaxckpt")
    try:
        for s in range(steps + 1):
            trainable, opt_state = step_fn(state["trainable"], state["opt_state"])
            state.update(trainable=trainable, opt_state=opt_state)
            if train_all is not None:
                state["backbone"] = train_all(state["backbone"])
            b.block(state)
            before = usage(d)
            b.idle_disk(d)
            t0 = time.perf_counter()
            if kind == "orbax_mgr":
                mngr.save(s, args=ocp.args.StandardSave(state))
                mngr.wait_until_finished()
                b.fsync_tree(os.path.join(d, str(s)))
            else:
                mngr.save(s, state)
                mngr.wait_until_finished()
            dt = time.perf_counter() - t0
            if s:
                durable.append(dt)
                new.append(usage(d) - before)
    finally:
        mngr.close()
    return durable, new, state


def run(b: Any, scale: float, res: Any, args: Any) -> None:
    """Runs W4 into ``res`` (bench.py's ``Results``); ``b`` is bench.py itself (its helpers)."""
    state, step_fn, train_all = make(scale)
    b.block(state)
    size = nbytes(state)
    changed = nbytes(state["trainable"]) + nbytes(state["opt_state"])
    res.notes["W4"] = {
        "bytes": size,
        "changed_bytes": changed,
        "leaves": len(jax.tree_util.tree_leaves(state)),
    }
    print(
        f"\nW4: {size / b.GiB:.3f} GiB, {changed / 2**20:.1f} MiB of it changes each step",
        flush=True,
    )
    base = os.path.join(args.dir, "W4")
    os.makedirs(base, exist_ok=True)
    names = args.tools.split(",")
    tools = [t for t in ("jaxckpt", "jaxckpt_full", "orbax_mgr") if t.split("_full")[0] in names]
    last: dict[str, tuple[str, Any]] = {}
    for rep in range(args.repeats):
        for kind in tools:
            d = os.path.join(base, f"{kind}-{rep}")
            durable, new, saved = loop(b, d, state, max(1, args.steps), kind, step_fn, None)
            for t, n in zip(durable, new, strict=True):
                res.add("W4", "w4_durable", kind, t)
                res.add("W4", "w4_new_bytes_x", kind, n / changed)
            if kind != "orbax_mgr":
                last[kind] = (os.path.join(d, f"ckpt-{max(1, args.steps)}"), saved)
        for path, saved in last.values():  # untimed: the first restore of a process pays more
            b.block(jc.restore(path, b.abstract(saved)))
        for kind, (path, saved) in last.items():  # a linked checkpoint vs one written in full
            target = b.abstract(saved)
            dt, out = b.timed(lambda p=path, t=target: b.block(jc.restore(p, t)))
            res.add("W4", "w4_restore_warm", kind, dt)
            del out
            b.drop_caches(base)
            dt, out = b.timed(lambda p=path, t=target: b.block(jc.restore(p, t)))
            res.add("W4", "w4_restore_cold", kind, dt)
            del out
        for kind in [t for t in tools if t != "orbax_mgr"]:  # every leaf changes each step
            d = os.path.join(base, f"fulltrain-{kind}-{rep}")
            durable, _, _ = loop(b, d, state, max(1, args.steps), kind, step_fn, train_all)
            for t in durable:
                res.add("W4", "w4_fulltrain_durable", kind, t)
        for name in os.listdir(base):
            b.remove(os.path.join(base, name))
    b.remove(base)


def floors(res: Any) -> list[tuple[str, float | None, float | None, str]]:
    """The issue's aims for W4: (description, measured, bound, unit)."""
    m = res.median

    def times(x: float | None, k: float) -> float | None:
        return None if x is None else x * k

    return [
        (
            "W4 new bytes per save <= 1.1x the changed leaves",
            m("W4", "w4_new_bytes_x", "jaxckpt"),
            1.1,
            "x",
        ),
        (
            "W4 save until durable <= 0.1x a full save",
            m("W4", "w4_durable", "jaxckpt"),
            times(m("W4", "w4_durable", "jaxckpt_full"), 0.1),
            "s",
        ),
        (
            "W4 save until durable <= 0.1x Orbax's manager",
            m("W4", "w4_durable", "jaxckpt"),
            times(m("W4", "w4_durable", "orbax_mgr"), 0.1),
            "s",
        ),
        (
            "W4 restore cold of a linked step <= 1.1x a full one",
            m("W4", "w4_restore_cold", "jaxckpt"),
            times(m("W4", "w4_restore_cold", "jaxckpt_full"), 1.1),
            "s",
        ),
        (
            "W4 full training, incremental <= 1.1x incremental=False",
            m("W4", "w4_fulltrain_durable", "jaxckpt"),
            times(m("W4", "w4_fulltrain_durable", "jaxckpt_full"), 1.1),
            "s",
        ),
    ]
