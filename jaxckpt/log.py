"""What jaxckpt tells ``logging.getLogger("jaxckpt")``: one INFO line per save, restore,
retention decision and deletion; DEBUG lines for the phases of a save and a restore.

The lines come from decorators on those functions, so the functions themselves stay as they
are; nothing is measured or counted unless the level is enabled. See docs/api.md, "Logging".
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax

from jaxckpt.checkpoint import incremental as _incremental

log = logging.getLogger("jaxckpt")
F = TypeVar("F", bound=Callable[..., Any])


def _array_bytes(tree: Any) -> tuple[int, int]:
    """(bytes of the array leaves, number of leaves) of a tree; objects count as leaves."""
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(int(getattr(x, "nbytes", 0) or 0) for x in leaves), len(leaves)


def _files(path: str) -> str:
    from jaxckpt import storage  # storage logs its phases through this module

    n = storage.at(path).count()  # None: counting would cost a listing
    if n is None:
        return ""
    done = _incremental.stats(path)
    if done is None:
        return f" in {n} files"
    return f" in {n} files ({done[0]} written, {done[1]} linked)"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-9) / 2**30:.2f} GiB/s"


def _step(step: Any) -> str:
    return f" (step {step})" if step is not None else ""


def logged_save(fn: F) -> F:
    """``save``: 'saved PATH (step S): B bytes in N files (W written, L linked), T s, R GiB/s'
    (W and L: the chunk bytes this process wrote and hard-linked, on a local disk)."""

    @functools.wraps(fn)
    def save(*args: Any, **kw: Any) -> Any:
        if not log.isEnabledFor(logging.INFO):
            return fn(*args, **kw)
        t0 = time.perf_counter()
        final = fn(*args, **kw)
        seconds = time.perf_counter() - t0
        nbytes, _ = _array_bytes(args[1] if len(args) > 1 else kw.get("tree"))
        log.info(
            "saved %s%s: %d bytes%s, %.3f s, %s",
            final,
            _step(kw.get("step")),
            nbytes,
            _files(final),
            seconds,
            _rate(nbytes, seconds),
        )
        return final

    return save  # type: ignore[return-value]


def logged_save_async(fn: F) -> F:
    """``save_async``: once durable, 'saved PATH (step S) asynchronously: B bytes in N files
    (W written, L linked), the call blocked T0 s, durable after T1 s, R GiB/s' (R over T1)."""

    @functools.wraps(fn)
    def save_async(*args: Any, **kw: Any) -> Any:
        if not log.isEnabledFor(logging.INFO):
            return fn(*args, **kw)
        # Counted before the call: the caller may donate or delete the arrays once it returns.
        nbytes, _ = _array_bytes(args[1] if len(args) > 1 else kw.get("tree"))
        t0 = time.perf_counter()
        handle = fn(*args, **kw)
        blocked = time.perf_counter() - t0

        def done(_: Any) -> None:
            if handle.exception() is not None:
                return  # raised to the caller by wait(), the next save or the manager
            seconds = time.perf_counter() - t0
            log.info(
                "saved %s%s asynchronously: %d bytes%s, the call blocked %.3f s, durable "
                "after %.3f s, %s",
                handle.path,
                _step(kw.get("step")),
                nbytes,
                _files(handle.path),
                blocked,
                seconds,
                _rate(nbytes, seconds),
            )

        handle.add_done_callback(done)
        return handle

    return save_async  # type: ignore[return-value]


def logged_restore(fn: F) -> F:
    """``restore``: 'restored PATH: B bytes in L leaves, T s, R GiB/s'."""

    @functools.wraps(fn)
    def restore(*args: Any, **kw: Any) -> Any:
        if not log.isEnabledFor(logging.INFO):
            return fn(*args, **kw)
        t0 = time.perf_counter()
        tree = fn(*args, **kw)
        seconds = time.perf_counter() - t0
        nbytes, leaves = _array_bytes(tree)
        log.info(
            "restored %s: %d bytes in %d leaves, %.3f s, %s",
            os.path.abspath(os.fspath(args[0] if args else kw["path"])),
            nbytes,
            leaves,
            seconds,
            _rate(nbytes, seconds),
        )
        return tree

    return restore  # type: ignore[return-value]


def logged_retention(fn: F) -> F:
    """A manager's ``_doomed``: 'retention in DIR: keeping steps [...], deleting [...] (why)'."""

    @functools.wraps(fn)
    def doomed(mngr: Any) -> list[int]:
        out: list[int] = fn(mngr)
        if log.isEnabledFor(logging.INFO):
            rules = [
                f"{k}={getattr(mngr, k)!r}"
                for k in ("max_to_keep", "keep_every_n_steps", "keep_every_n_hours", "best_metric")
                if getattr(mngr, k) is not None
            ]
            if mngr.best_metric is not None:
                rules.append(f"best_mode={mngr.best_mode!r}")
            kept = [s for s in mngr.steps if s not in out]
            log.info(
                "retention in %s: keeping steps %s, deleting %s (%s)",
                mngr.directory,
                kept,
                out,
                ", ".join(rules) or "no rule",
            )
        return out

    return doomed  # type: ignore[return-value]


def logged_deletion(fn: F) -> F:
    """A manager's ``_delete``: 'deleted PATH (step S)'."""

    @functools.wraps(fn)
    def delete(mngr: Any, step: int) -> Any:
        out = fn(mngr, step)
        log.info("deleted %s (step %d)", mngr.checkpoint_path(step), step)
        return out

    return delete  # type: ignore[return-value]


def phase(name: str) -> Callable[[F], F]:
    """A DEBUG line 'NAME (WHERE): T s' (WHERE: the first argument, or its ``path``)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def timed(*args: Any, **kw: Any) -> Any:
            if not log.isEnabledFor(logging.DEBUG):
                return fn(*args, **kw)
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            where = args[0] if args and isinstance(args[0], str) else getattr(args[0], "path", "")
            log.debug("%s (%s): %.3f s", name, where, time.perf_counter() - t0)
            return out

        return timed  # type: ignore[return-value]

    return wrap
