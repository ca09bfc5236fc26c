"""Process index and barriers; exact no-ops on one process."""

from __future__ import annotations

import jax


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Waits until every process reaches ``name``; a no-op on one process."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            "jaxckpt: several JAX processes but no distributed client. Fix: call "
            "jax.distributed.initialize() before saving."
        )
    client.wait_at_barrier(name, int(timeout_s * 1000))
