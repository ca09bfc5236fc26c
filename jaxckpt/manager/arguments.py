"""The checks of what a :class:`jaxckpt.CheckpointManager` is given: its arguments, its
directory, and what ``restore``'s first argument names."""

from __future__ import annotations

import operator
from typing import Any

from jaxckpt import storage as _storage
from jaxckpt.errors import CheckpointError
from jaxckpt.local_tier import tier as _local_tier
from jaxckpt.manager import retention as _retention

PyTree = Any


def check(
    rules: _retention.Rules,
    save_interval_steps: int,
    local_save_interval_steps: int,
    local_max_to_keep: int,
    peer_replicas: int,
) -> None:
    """Raises ``ValueError`` for an argument no run could follow."""
    check_count("max_to_keep", rules.max_to_keep, none_ok=True)
    check_count("keep_every_n_steps", rules.keep_every_n_steps, none_ok=True)
    check_count("save_interval_steps", save_interval_steps, none_ok=False)
    _local_tier.check(local_save_interval_steps, local_max_to_keep, peer_replicas)
    hours = rules.keep_every_n_hours
    if hours is not None and not hours > 0:
        raise ValueError(
            f"keep_every_n_hours must be a positive number of hours or None, not {hours!r}."
        )
    if rules.best_mode not in ("min", "max"):
        raise ValueError(f'best_mode must be "min" or "max", not {rules.best_mode!r}.')


def check_count(name: str, value: int | None, none_ok: bool) -> None:
    """Raises ``ValueError`` unless ``value`` is a positive int (or, with ``none_ok``, None)."""
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "a positive int or None" if none_ok else "a positive int"
        raise ValueError(f"{name} must be {allowed}, not {value!r}.")


def check_directory(directory: str, store: _storage.Store) -> None:
    """Raises ``CheckpointError`` where ``directory`` is itself a checkpoint."""
    if store.is_committed():
        raise CheckpointError(
            f"{directory} is a checkpoint (it holds {_storage.COMMIT}), not a directory "
            "of checkpoints: a manager would write its checkpoints inside it. Fix: give the "
            "manager the run's directory (the one holding ckpt-<step> checkpoints), or read "
            f"this checkpoint with jc.restore({directory!r})."
        )


def step_and_target(step: Any, target: PyTree) -> tuple[Any, PyTree]:
    """``restore(step, target)``'s arguments as a step (None: the latest) and a target: an
    integer first argument is always a step; any other, alone, is the target."""
    if step is None or _is_step(step):
        return step, target
    if target is not None:
        raise TypeError(
            f"restore's first argument is a step (an int) or, alone, the target; it "
            f"was given a {type(step).__name__} and a target as well. Fix: "
            "mngr.restore(target) for the latest step, or mngr.restore(step, target)."
        )
    return None, step


def _is_step(x: Any) -> bool:
    """Whether ``restore``'s first argument names a step rather than being the target: an
    integer, or a value no target is (a float, a string) so that check_step says what is wrong."""
    if isinstance(x, (float, str, bytes, bool)):
        return True
    try:
        operator.index(x)
    except TypeError:
        return False
    return True
