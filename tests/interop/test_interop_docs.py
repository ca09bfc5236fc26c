"""docs/interop.md runs as written: its Python blocks one after another, top to bottom, as a
reader runs them; where a block is followed by a ```text block, it prints what that block shows."""

import contextlib
import io
import logging
import os
import re

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "interop.md")
SECTIONS = ["safetensors", "Orbax", "Flax msgpack", "Converting", "Fine-tuning with a new head"]


def _blocks(section: str) -> list[tuple[str, str | None]]:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"```python\n(.*?)```\n(?:\n```text\n(.*?)```\n)?", body, re.S)
    return [(code, shown or None) for code, shown in found]


def test_every_section_is_checked():
    with open(DOC, encoding="utf-8") as f:
        assert re.findall(r"^## (.+)$", f.read(), re.M) == SECTIONS


def test_the_page_runs_top_to_bottom(tmp_path, monkeypatch):
    logging.getLogger("absl").setLevel(logging.ERROR)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for section in SECTIONS:
        blocks = _blocks(section)
        assert blocks, section
        for code, shown in blocks:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"docs/interop.md ({section})", "exec"), scope)
            if shown is not None:
                assert out.getvalue() == shown, section
