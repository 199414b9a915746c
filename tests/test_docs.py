"""The docs: every command, shipped config, plug-in and Hugging Face family has the one-line
description the generated reference pages print, and those pages list every one of them; the
README stays a front page whose links resolve and whose test command is the one CI runs."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from sparsejax import config
from sparsejax.cli import build_parser
from sparsejax.interop.families import FAMILIES
from sparsejax.listing import first_comment
from sparsejax.registry import REGISTRIES, describe

ROOT = Path(__file__).resolve().parents[1]
config.register_configurables()  # every plug-in and configurable, as the docs build sees them


def generated_pages():
    """docs/_ext/generated_pages.py, the module the docs build writes the reference with."""
    spec = importlib.util.spec_from_file_location(
        "generated_pages", ROOT / "docs" / "_ext" / "generated_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands() -> dict[str, str]:
    """{command: its one-line help}, from the parsers `sparsejax` builds."""
    pages = generated_pages()
    return {name: help_ for name, help_, _ in pages._subcommands(build_parser())}


def test_every_command_config_plugin_and_family_has_a_description():
    missing = [f"command {n!r}" for n, h in commands().items() if not h.strip()]
    missing += [f"config {n!r}" for n in config.shipped_configs()
                if not first_comment(config.config_dir() / n)]
    missing += [f"{kind} {n!r}" for kind, reg in REGISTRIES.items() for n in reg.names()
                if not describe(reg.get(n))]
    missing += [f"hugging face family {n!r}" for n, d in FAMILIES.items() if not d.strip()]
    assert not missing, f"no description (docstring, help= or opening comment): {missing}"


def test_generated_pages_list_every_command_config_plugin_and_configurable():
    pages = generated_pages()
    cli, configs = pages.cli_page(), pages.configs_page("https://example.invalid/repo")
    registries, configurables = pages.registries_page(), pages.configurables_page()
    assert commands() and all(f"## `sparsejax {n}`" in cli for n in commands())
    assert all(f"## `{n}`" in configs for n in config.shipped_configs())
    for kind, reg in REGISTRIES.items():
        section = registries.split(f"## {kind}\n", 1)[1].split("\n## ", 1)[0]
        assert all(f"| `{n}` | {pages.cell(describe(reg.get(n)))} |" in section
                   for n in reg.names()), kind
    assert all(f"| `{n}` |" in registries for n in FAMILIES)
    table = pages.configurables()
    assert "MaskedPruningMethod" in table and "SparseDecode" in table
    for name, (_, params) in table.items():
        assert f"### `{name}`" in configurables
    # a default is the signature's: SparseDecode.max_density is 0.9 unless bound
    assert ("max_density", "0.9", "float") in table["SparseDecode"][1]


def test_readme_is_a_front_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert local and [link for link in local if not (ROOT / link).exists()] == []
    guides = {p.name for p in (ROOT / "docs" / "guides").glob("*.md")} - {"index.md"}
    assert guides == {Path(link).name for link in local if link.startswith("docs/guides/")}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(pip install -e '\.\[test\]'[^\n]*)\n```", readme).group(1)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert any(line.startswith(command + " ") for line in ci), command
