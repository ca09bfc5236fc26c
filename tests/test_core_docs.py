"""The examples of docs/api.md run, in order, and print what the page shows."""

from __future__ import annotations

import contextlib
import io
import os
import re

import jax.numpy as jnp
import pytest

import jaxckpt as jc

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")


def _blocks(lang: str) -> list[str]:
    with open(DOC, encoding="utf-8") as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


def _shown(text: str, path: str) -> str:
    return text.replace(path, "/…/run/ckpt-10").strip()


def test_api_examples_run_and_print_what_the_page_shows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in _blocks("python"):
            exec(compile(code, DOC, "exec"), scope)
    path = scope["path"]
    texts = _blocks("text")
    assert _shown(out.getvalue(), path) == texts[0].strip()

    wider = scope["Net"]().init(scope["jax"].random.key(0), jnp.ones((1, 2)))
    target = {**scope["fresh"], "params": wider["params"], "opt_state": scope["tx"].init(wider)}
    with pytest.raises(jc.StructureMismatchError) as e:
        jc.restore(path, target)
    assert _shown(str(e.value), path) == texts[-1].strip()
