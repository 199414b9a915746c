"""Sphinx configuration of the sparsejax docs site (`make -C docs html`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# the build imports the package (autodoc, generated pages) on the CPU, whatever the machine has
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent / "_ext"))  # this site's own extensions

from generated_pages import repository_url  # noqa: E402  (found through the path above)
from sparsejax.config import OPTIONAL_MODULES  # noqa: E402

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
# modules that import an optional extra (sparsejax.config.OPTIONAL_MODULES: lm_eval's model)
# are left out of the API pages (_templates/autosummary/module.rst): the build installs only
# [docs], and a mocked lm_eval makes their classes undocumentable
autosummary_context = {"optional_modules": OPTIONAL_MODULES}

html_theme = "sphinx_book_theme"
html_title = "sparsejax"
html_theme_options = {
    "repository_url": repository_url(),  # [project.urls] in pyproject.toml
    "use_repository_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}

