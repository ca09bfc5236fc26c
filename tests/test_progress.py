"""jc.set_progress: the progress line of Python saves and restores, off unless asked."""

import io
import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt as jc
from jaxckpt import progress as _progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def progress(monkeypatch):
    """Progress on, drawn into a StringIO; off again after the test."""
    monkeypatch.setattr(_progress, "_settings", dict(_progress._settings))
    stream = io.StringIO()
    jc.set_progress(True, stream=stream)
    return stream


def tree():
    return {
        "a": np.arange(1 << 18, dtype=np.float32),  # 1 MiB
        "b": jnp.ones((256, 512), jnp.float32),  # 512 KiB
        "small": {f"x{i}": np.float32(i) for i in range(20)},  # packed
        "step": 3,
    }


TOTAL = (1 << 20) + (1 << 19) + 20 * 4
FULL = "[##############################] 100.0%  1.5 MiB of 1.5 MiB"


def test_nothing_is_shown_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_progress, "_settings", dict(_progress._settings))
    assert _progress._settings["on"] is False  # the default
    t = tree()
    jc.save(tmp_path / "c", t)
    jc.restore(tmp_path / "c", t)
    jc.set_progress(True)
    jc.set_progress(False)
    jc.save(tmp_path / "d", t)
    assert capsys.readouterr() == ("", "")


def test_save_restore_and_the_manager_draw_one_line_each(tmp_path, progress):
    t = tree()
    path = jc.save(tmp_path / "c", t, step=1)
    jc.restore(path, t)
    jc.restore(path)  # no target: NumPy
    jc.restore(path, {"a": t["a"]}, partial=True)
    jc.save_async(tmp_path / "d", t).wait()
    with jc.CheckpointManager(tmp_path / "run", async_save=True) as mngr:
        mngr.save(5, t)
        mngr.wait_until_finished()
        mngr.restore(5, t)
    lines = progress.getvalue().splitlines()
    assert lines == [
        f"save {path}: {FULL}",
        f"restore {path}: {FULL}",
        f"restore {path}: {FULL}",
        f"restore {path}: [##############################] 100.0%  1.0 MiB of 1.0 MiB",
        f"save {tmp_path / 'd'}: {FULL}",
        f"save {tmp_path / 'run' / 'ckpt-5'}: {FULL}",
        f"restore {tmp_path / 'run' / 'ckpt-5'}: {FULL}",
    ]


def test_on_a_terminal_the_line_is_redrawn_as_pieces_land(tmp_path, progress, monkeypatch):
    terminal = Terminal()
    jc.set_progress(True, stream=terminal)
    monkeypatch.setitem(_progress._settings, "every", 0.0)  # draw every update
    t = {f"w{i}": np.full((1 << 16,), i, np.float32) for i in range(8)}  # 8 pieces of 256 KiB
    jc.save(tmp_path / "c", t)
    out = terminal.getvalue()
    assert out.endswith(" 100.0%  2.0 MiB of 2.0 MiB\n") and out.count("\n") == 1
    fractions = [float(f) for f in re.findall(r"\rsave \S+: \[#*\s*\]\s+([\d.]+)%", out)]
    assert fractions == sorted(fractions) and len(set(fractions)) >= 3, out
    assert fractions[:8] == [12.5, 25.0, 37.5, 50.0, 62.5, 75.0, 87.5, 100.0]


def test_a_failed_save_ends_the_line_it_was_drawing(tmp_path, monkeypatch, progress):
    from jaxckpt.checkpoint import write as _write

    terminal = Terminal()
    jc.set_progress(True, stream=terminal)

    def fail(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_write, "write_arrays", fail)
    with pytest.raises(Exception, match="No space left on device"):
        jc.save(tmp_path / "c", tree())
    assert terminal.getvalue() == "\n"


def test_set_progress_takes_a_bool_and_a_stream():
    with pytest.raises(TypeError, match="set_progress takes True or False, not 'yes'"):
        jc.set_progress("yes")
    with pytest.raises(TypeError, match="set_progress's stream must have a write\\(\\) method"):
        jc.set_progress(True, stream=42)
