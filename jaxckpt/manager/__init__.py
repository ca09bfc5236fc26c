"""Many checkpoints of one run: ``CheckpointManager`` and ``latest_checkpoint``.

A manager's directory holds one checkpoint per saved step, ``ckpt-<step>``, and an index file,
``checkpoint`` (JSON: each step's path, time and metrics), rewritten atomically after every
change. The committed step directories are the truth: a missing or stale index is rebuilt from
them. Every filesystem operation goes through :mod:`jaxckpt.storage`.

Modules: ``checkpoint_manager`` (the manager's calls), ``steps`` (the run's committed steps,
its index, foreign steps, debris; ``latest_checkpoint``), ``retention`` (which checkpoints are
kept), ``in_flight`` (asynchronous saves in flight, the manager's worker) and ``arguments``
(the checks of what a manager is given).
"""

from jaxckpt.manager.checkpoint_manager import CheckpointManager
from jaxckpt.manager.steps import latest_checkpoint

__all__ = ["CheckpointManager", "latest_checkpoint"]
