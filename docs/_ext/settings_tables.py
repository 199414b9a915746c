"""Sphinx extension: tables generated from the code, placed inside a hand-written page.

```{gin-settings} MaskedPruningMethod DropGrowSchedule
```
    the parameters of those gin configurables with their defaults and types;

```{registry} criterion
```
    the entries of a registry (the kinds `sparsejax list` prints) with their descriptions;

```{configs} sparsity/
```
    the shipped configs whose names start with the argument, with their opening comment.

A name that does not exist stops the build, so a guide cannot name a setting or registry that
the code no longer has.
"""
from __future__ import annotations

from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from generated_pages import cell, opening_comment, settings_table, slug
from sparsejax import config
from sparsejax.registry import REGISTRIES


class GinSettings(SphinxDirective):
    """The parameters, defaults and types of the gin configurables named as arguments."""
    required_arguments = 1
    optional_arguments = 50

    def run(self):
        try:
            text = settings_table(list(self.arguments))
        except ValueError as e:
            raise self.error(str(e)) from e
        return self.parse_text_to_nodes(text)


class RegistryTable(SphinxDirective):
    """The entries of one registry with their one-line descriptions."""
    required_arguments = 1
    final_argument_whitespace = True
    option_spec = {"caption": directives.unchanged}

    def run(self):
        kind = self.arguments[0].strip()
        if kind not in REGISTRIES:
            raise self.error(f"registry: {kind!r} is not a registry kind; valid: "
                             f"{sorted(REGISTRIES)}")
        rows = ["| name | description |", "|---|---|"]
        rows += [f"| `{n}` | {cell(d)} |" for n, d in REGISTRIES[kind].describe().items()]
        rows.append(f"\n(Generated from the {kind} registry; see also "
                    f"[the registries](#registry-{slug(kind)}).)")
        return self.parse_text_to_nodes("\n".join(rows))


class ConfigTable(SphinxDirective):
    """The shipped configs under one prefix with their opening comment."""
    required_arguments = 1

    def run(self):
        prefix = self.arguments[0]
        names = [n for n in config.shipped_configs() if n.startswith(prefix)]
        if not names:
            raise self.error(f"configs: no shipped config starts with {prefix!r}; configs: "
                             f"{config.shipped_configs()}")
        rows = ["| config | what it sets |", "|---|---|"]
        rows += [f"| [`{n}`](#config-{slug(n)}) | {cell(opening_comment(config.config_dir() / n))} |"
                 for n in names]
        return self.parse_text_to_nodes("\n".join(rows))


def setup(app: Sphinx) -> dict:
    app.add_directive("gin-settings", GinSettings)
    app.add_directive("registry", RegistryTable)
    app.add_directive("configs", ConfigTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
