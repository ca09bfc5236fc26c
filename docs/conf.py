"""Sphinx configuration of the jaxckpt docs site (``make docs``).

The pages are the Markdown files of this directory (MyST), the API reference comes from the
docstrings (``reference.md``), and the notebooks of ``colab/`` are copied into ``notebooks/``
(generated, not tracked) and executed by MyST-NB at build time.
"""

import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the source tree's jaxckpt, installed or not

import jaxckpt  # noqa: E402

project = "jaxckpt"
author = "the jaxckpt authors"
release = version = jaxckpt.__version__
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = f"jaxckpt {version}"
html_theme_options = {"show_toc_level": 2}
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
nitpicky = False

# Notebooks run at build time, each in a fresh kernel, in a scratch directory of their own.
nb_execution_mode = os.environ.get("JAXCKPT_DOCS_EXECUTE", "force")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_in_temp = True
nb_merge_streams = True

os.makedirs(os.path.join(HERE, "notebooks"), exist_ok=True)
for name in sorted(os.listdir(os.path.join(ROOT, "colab"))):
    if name.endswith(".ipynb"):
        shutil.copyfile(os.path.join(ROOT, "colab", name), os.path.join(HERE, "notebooks", name))

# Links the pages make to files of the repository outside docs/ (they work on GitHub): to the
# README, the front page; to the notebooks, their copies here; to anything else, its name.
_OUTSIDE = re.compile(r"\[([^\]\n]+)\]\(\.\./([^)\s]+)\)")


def _local_links(app, docname, source):
    if docname.startswith("notebooks/"):  # JSON: only the README link, one level down
        source[0] = source[0].replace("](../README.md)", "](../index.md)")
        return
    text = source[0].replace("](../README.md)", "](index.md)")
    text = re.sub(r"\]\(\.\./colab/([\w-]+)\.ipynb\)", r"](notebooks/\1.ipynb)", text)
    source[0] = _OUTSIDE.sub(r"\1 (`\2` in the repository)", text)


def setup(app):
    app.connect("source-read", _local_links)
