"""Sphinx configuration of the sparsejax docs site (`make -C docs html`)."""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from sphinx.ext.autodoc.mock import ismock

# the build imports the package (autodoc, generated pages) on the CPU, whatever the machine has
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent / "_ext"))  # this site's own extensions

from generated_pages import repository_url  # noqa: E402  (found through the path above)

project = "sparsejax"
author = "the sparsejax authors"
copyright = "the sparsejax authors"

extensions = [
    "myst_nb",  # MyST Markdown pages and notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx_copybutton",
    "generated_pages",  # docs/generated/: CLI, registries, configs, configurables, results
    "settings_tables",  # {gin-settings} and {registry} tables inside the guides
    "plain_docstrings",  # docstrings that are not reST shown as written
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
templates_path = ["_templates"]
default_role = "code"  # `x` in docstrings is code, as it is in Markdown
smartquotes = False  # commands in the text keep their -- and quotes

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tests/notebooks/test_notebooks.py executes them
nb_merge_streams = True

autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# lm_eval (and the datasets package it imports) is the optional [eval] extra: its model
# module is documented without it
autodoc_mock_imports = ["lm_eval", "datasets"]

html_theme = "sphinx_book_theme"
html_title = "sparsejax"
html_theme_options = {
    "repository_url": repository_url(),  # [project.urls] in pyproject.toml
    "use_repository_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}


def _skip_mocked(app, what, name, obj, skip, options):
    """Members that only exist through a mocked import (lm_eval's base class and decorators:
    a mock, or a function whose `__wrapped__` chain a mock makes endless) are left out."""
    try:
        inspect.unwrap(obj)
    except ValueError:  # wrapper loop
        return True
    return True if ismock(obj) else None


def setup(app):
    app.connect("autodoc-skip-member", _skip_mocked)
