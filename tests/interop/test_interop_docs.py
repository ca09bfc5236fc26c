"""The examples of docs/interop.md's Orbax and Flax msgpack sections run as written."""

import logging
import os
import re

import pytest

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "interop.md")


def _blocks(section: str) -> list[str]:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


@pytest.mark.parametrize("section", ["Orbax", "Flax msgpack"])
def test_section_examples_run(section, capsys):
    logging.getLogger("absl").setLevel(logging.ERROR)
    blocks = _blocks(section)
    assert blocks
    scope: dict = {}
    for code in blocks:  # one after another, as a reader runs them
        exec(compile(code, f"docs/interop.md ({section})", "exec"), scope)
    assert "restored" in scope
