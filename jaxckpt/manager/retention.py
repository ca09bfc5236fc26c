"""Which of a run's checkpoints a manager keeps: ``max_to_keep`` (by recency, or by
``best_metric``), ``keep_every_n_steps`` and ``keep_every_n_hours`` (their arguments are
checked in :mod:`jaxckpt.manager.arguments`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from jaxckpt.format import run as _run


class Rules(NamedTuple):
    """A manager's retention arguments, as :class:`jaxckpt.CheckpointManager` takes them."""

    max_to_keep: int | None
    keep_every_n_steps: int | None
    keep_every_n_hours: float | None
    best_metric: str | None
    best_mode: str


def ranked(entries: Mapping[int, _run.Entry], rules: Rules) -> list[int]:
    """Steps holding ``best_metric`` as a number, best first (NaN last; ties: the newer
    first). Other steps are never ranked (an older jaxckpt also stored array metrics)."""
    if rules.best_metric is None:
        return []
    sign = 1.0 if rules.best_mode == "min" else -1.0
    scored = []
    for e in entries.values():
        v = e.metrics.get(rules.best_metric)
        if isinstance(v, (int, float)):
            v = float(v)
            scored.append((math.isnan(v), sign * v if not math.isnan(v) else 0.0, -e.step))
    return [-s for _, _, s in sorted(scored)]


def doomed(entries: Mapping[int, _run.Entry], rules: Rules) -> list[int]:
    """The steps of ``entries`` (the manager's own: a foreign step is never deleted) that no
    rule keeps, oldest first; the newest step is always kept."""
    steps = sorted(entries)
    if rules.max_to_keep is None or not steps:
        return []
    keep = {steps[-1]}
    if rules.best_metric is None:
        keep.update(steps[-rules.max_to_keep :])
    else:
        best = ranked(entries, rules)
        keep.update(best[: rules.max_to_keep])
        # Steps saved without the metric are kept by recency, as without best_metric.
        keep.update(set(steps[-rules.max_to_keep :]) - set(best))
    if rules.keep_every_n_steps:
        keep.update(s for s in steps if s % rules.keep_every_n_steps == 0)
    if rules.keep_every_n_hours:
        last = None
        for s in steps:
            t = entries[s].time
            if last is None or t - last >= rules.keep_every_n_hours * 3600:
                keep.add(s)
                last = t
    return [s for s in steps if s not in keep]
