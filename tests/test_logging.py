"""The ``jaxckpt`` logger: one INFO line per save, restore, retention decision and deletion;
DEBUG lines for the phases."""

import logging
import os
import re
import time

import numpy as np
import pytest

import jaxckpt as jc

NUMBER = r"\d+\.\d{3} s"
RATE = r"\d+\.\d\d GiB/s"


def tree():
    return {"w": np.ones((4, 8), np.float32), "b": np.zeros(8, np.float32), "step": 3}


def files_in(path):
    return sum(len(f) for _, _, f in os.walk(path))


def messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.name == "jaxckpt" and r.levelno == level]


def one(caplog, pattern, level=logging.INFO):
    found = [m for m in messages(caplog, level) if re.fullmatch(pattern, m)]
    assert len(found) == 1, (pattern, messages(caplog, level))
    return found[0]


def test_a_save_and_a_restore_log_one_line_each(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    path = jc.save(tmp_path / "ckpt-10", tree(), step=10)
    one(
        caplog,
        rf"saved {re.escape(path)} \(step 10\): 160 bytes in {files_in(path)} files "
        r"\(128 written, 0 linked\), "  # b is all zeros: not written
        rf"{NUMBER}, {RATE}",
    )
    jc.restore(path, tree())
    one(caplog, rf"restored {re.escape(path)}: 160 bytes in 3 leaves, {NUMBER}, {RATE}")
    assert len(messages(caplog)) == 2
    assert messages(caplog, logging.DEBUG) == []  # phases only at DEBUG


def test_an_async_save_logs_its_blocking_time_and_when_it_was_durable(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    handle = jc.save_async(tmp_path / "ckpt-7", tree(), step=7)
    path = handle.wait()
    # The line is written by the handle's completion callback, just after wait() returns.
    deadline = time.monotonic() + 60
    while not messages(caplog) and time.monotonic() < deadline:
        time.sleep(0.01)
    one(
        caplog,
        rf"saved {re.escape(path)} \(step 7\) asynchronously: 160 bytes in {files_in(path)} "
        rf"files \(128 written, 0 linked\), the call blocked {NUMBER}, durable after {NUMBER}, {RATE}",
    )


def test_the_manager_logs_each_retention_decision_and_deletion(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    run = str(tmp_path / "run")
    with jc.CheckpointManager(run, max_to_keep=2, async_save=False) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, tree())
    for kept, deleted in (([1], []), ([1, 2], []), ([2, 3], [1])):
        one(
            caplog,
            re.escape(
                f"retention in {run}: keeping steps {kept}, deleting {deleted} (max_to_keep=2)"
            ),
        )
    one(caplog, re.escape(f"deleted {run}/ckpt-1 (step 1)"))
    assert len([m for m in messages(caplog) if m.startswith("saved ")]) == 3


def test_retention_names_every_rule(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    run = str(tmp_path / "run")
    with jc.CheckpointManager(
        run, max_to_keep=1, keep_every_n_steps=2, best_metric="loss", async_save=False
    ) as mngr:
        mngr.save(2, tree(), metrics={"loss": 1.0})
        mngr.save(3, tree(), metrics={"loss": 2.0})
    one(
        caplog,
        re.escape(
            f"retention in {run}: keeping steps [2, 3], deleting [] (max_to_keep=1, "
            "keep_every_n_steps=2, best_metric='loss', best_mode='min')"
        ),
    )


def test_debug_lines_time_the_phases(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="jaxckpt")
    path = jc.save(tmp_path / "ckpt", tree())
    jc.restore(path, tree())
    phases = [re.sub(r" \(.*\): " + NUMBER + "$", "", m) for m in messages(caplog, logging.DEBUG)]
    assert phases == [
        "save: wrote the arrays",
        "save: wrote the metadata",
        "save: made the files durable",
        "save: committed",
        "restore: matched the target",
        "restore: read the arrays",
    ]
    assert f"restore: read the arrays ({path}): " in messages(caplog, logging.DEBUG)[-1]


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_nothing_is_counted_unless_asked(tmp_path, caplog, level, monkeypatch):
    from jaxckpt import log as _log

    walked = []
    monkeypatch.setattr(_log.os, "walk", lambda p: walked.append(p) or iter(()))
    caplog.set_level(level, logger="jaxckpt")
    jc.save(tmp_path / "ckpt", tree())
    assert bool(walked) == (level == logging.INFO)
