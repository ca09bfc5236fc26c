"""The README's Python runs as it stands: every ```python block, in order, as one script."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
MARK = "\n<<<readme block {}>>>\n"


def blocks(text):
    """``(python source, the text block right after it or None)`` for each ```python block."""
    fences = list(FENCE.finditer(text))
    out = []
    for i, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        shown = None
        if nxt is not None and nxt.group(1) == "text" and not text[m.end() : nxt.start()].strip():
            shown = nxt.group(2)
        out.append((m.group(2), shown))
    return out


def test_blocks_finds_python_and_the_output_shown_under_it():
    text = "a\n```python\nprint(1)\n```\n\n```text\n1\n```\n```sh\nls\n```\n```python\nx = 2\n```\n"
    assert blocks(text) == [("print(1)\n", "1\n"), ("x = 2\n", None)]


def test_readme_python_blocks_run_verbatim(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        found = blocks(f.read())
    assert len(found) >= 3
    script = "".join(
        f"print({MARK.format(i)!r}, end='', flush=True)\n{src}" for i, (src, _) in enumerate(found)
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    printed = re.split(r"\n<<<readme block \d+>>>\n", proc.stdout)[1:]
    assert len(printed) == len(found)
    for (src, shown), got in zip(found, printed, strict=True):
        if shown is not None:
            assert got == shown, f"the README shows\n{shown}under\n{src}but it prints\n{got}"
    # The manager block wrote its checkpoints into the working directory, as it says.
    assert sorted(os.listdir(tmp_path / "tf_ckpts")) == [
        ".jaxckpt-writer",
        "checkpoint",
        "ckpt-30",
        "ckpt-40",
        "ckpt-50",
    ]
