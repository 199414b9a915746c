"""Sphinx extension: a docstring that is not valid reStructuredText is shown as written.

The package's docstrings are plain text with `code` in backticks, not reST. Most of them parse
as reST as they are (with `default_role = "code"` the backticks render as code); one that
does not (a `*args`, an indented continuation, a `name_` read as a link) is shown as a
literal block; `|x|` (an absolute value, not a substitution) is kept as written instead of failing the warnings-as-errors build or rendering garbled.
"""
from __future__ import annotations

import io

import docutils.core
from docutils import nodes
from sphinx.application import Sphinx


def parses_cleanly(text: str, env) -> bool:
    """Whether docutils parses `text` as reST without a warning or an error (with Sphinx's
    roles and directives, which read the build environment `env`)."""
    doctree = docutils.core.publish_doctree(text, settings_overrides={
        "report_level": 5, "halt_level": 5, "warning_stream": io.StringIO(),
        "default_role": "code", "env": env})
    return not (any(m["level"] >= 2 for m in doctree.findall(nodes.system_message))
                or any(True for _ in doctree.findall(nodes.problematic)))


def literal_when_not_rest(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = [line.replace("|", "\\|") for line in lines]  # |x| is an absolute value
    text = "\n".join(lines)
    if text.strip() and not parses_cleanly(text, app.env):
        lines[:] = ["::", ""] + ["   " + line.replace("\\|", "|") for line in lines] + [""]


def setup(app: Sphinx) -> dict:
    app.connect("autodoc-process-docstring", literal_when_not_rest)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
