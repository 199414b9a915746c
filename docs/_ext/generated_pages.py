"""Sphinx extension: writes the pages that come from the code, before Sphinx reads any page.

Under `docs/generated/` (not in git), every build:

* `cli.md`: every `sparsejax` command, from the argparse parsers of `sparsejax/cli.py`;
* `registries.md`: every registry's entries with the one line `sparsejax list` prints;
* `configs.md`: the shipped gin files with their opening comment and their text;
* `configurables.md`: every gin configurable of `sparsejax` and `pallas_kernels` with its
  parameters and defaults;
* `benchmarks.md`: each script of `benchmarks/` with its docstring;
* `results/`: `experiments/README.md`, the reproduction pages of `experiments/results/` and
  their plots; `tpu.md`: `tpu/README.md`; `notebooks/`: the notebooks of `notebooks/`.

Copied pages keep their text; a link to a file the site does not hold points at the file in
the repository (the URL of `[project.urls]` in pyproject.toml).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
from pathlib import Path

import gin

from sparsejax import config
from sparsejax.cli import build_parser
from sparsejax.interop.families import FAMILIES
from sparsejax.listing import first_comment
from sparsejax.registry import REGISTRIES, describe

ROOT = Path(__file__).resolve().parents[2]  # the repository
OUT = ROOT / "docs" / "generated"
PACKAGES = ("sparsejax", "pallas_kernels")
LINK = re.compile(r"(!?\[[^\]]*\])\(([^)\s]+)\)")


def repository_url() -> str:
    """[project.urls] Repository in pyproject.toml: the one place the URL is written."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.urls]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^Repository\s*=\s*"([^"]+)"', section, re.MULTILINE).group(1)


def cell(text: object) -> str:
    """Text that fits in one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code(text: object) -> str:
    """Inline code for a table cell (backticks inside the value are dropped)."""
    text = cell(text).replace("`", "'")
    return f"`{text}`" if text else ""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --- CLI -----------------------------------------------------------------------------------

def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, in the order they were added."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    return [(name, helps.get(name, ""), p) for name, p in sub.choices.items()]


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    fmt = parser._get_formatter()
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        flags = ", ".join(a.option_strings) or a.dest
        if a.option_strings and a.nargs != 0:
            flags += f"={a.metavar or a.dest.upper()}"
        default = "" if a.default in (None, argparse.SUPPRESS) or a.nargs == 0 else a.default
        rows.append(f"| {code(flags)} | {code(repr(default)) if default != '' else ''} | "
                    f"{cell(fmt._expand_help(a) if a.help else '')} |")
    return rows


def cli_page() -> str:
    os.environ["COLUMNS"] = "90"  # argparse wraps usage lines at the terminal's width
    parser = build_parser()
    out = ["# Command line", "",
           "Generated from the argparse parsers of `sparsejax/cli.py` (each command's module is",
           "listed in `COMMAND_MODULES`). Every command also takes `--gin.Configurable.param=VALUE`",
           "bindings, applied after its gin files (see [Concepts](../concepts.md)), and",
           "`sparsejax COMMAND --help` prints the same options.", "",
           "| command | what it does |", "|---|---|"]
    commands = _subcommands(parser)
    out += [f"| [`{n}`](#cli-{n}) | {cell(h)} |" for n, h, _ in commands]
    for name, help_, p in commands:
        out += ["", f"({'cli-' + name})=", f"## `sparsejax {name}`", "", cell(help_), "",
                "```text", p.format_usage().strip(), "```", ""]
        rows = _option_rows(p)
        if rows:
            out += ["| option | default | meaning |", "|---|---|---|", *rows]
    return "\n".join(out) + "\n"


def opening_comment(path: Path) -> str:
    """The comment lines a gin file opens with, joined (its first line is what `sparsejax
    list` prints)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        indented = line.startswith("#  ")  # an example command: shown as code
        lines.append(f"`{text.replace('`', '')}`" if indented and text else text)
    return " ".join(lines) or first_comment(path)


# --- registries, configs -------------------------------------------------------------------

def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '')}".rstrip(".")


def registries_page() -> str:
    out = ["# Registries", "",
           "Every named plug-in, as `sparsejax list` prints it: the name a config gives, the",
           "first line of its docstring and where it is defined. A module outside the package",
           "adds entries by registering them (see [Concepts](../concepts.md#plug-ins)).", ""]
    out += [f"- [{kind}](#registry-{slug(kind)}) ({len(reg)})" for kind, reg in REGISTRIES.items()]
    out.append(f"- [Hugging Face family](#registry-hf-family) ({len(FAMILIES)})")
    for kind, reg in REGISTRIES.items():
        out += ["", f"(registry-{slug(kind)})=", f"## {kind}", "",
                "| name | description | defined in |", "|---|---|---|"]
        out += [f"| `{n}` | {cell(d)} | {code(_where(reg.get(n)))} |"
                for n, d in reg.describe().items()]
    out += ["", "(registry-hf-family)=", "## Hugging Face family", "",
            "The `model_type`s of `config.json` that `sparsejax import-hf` reads and `export-hf`",
            "writes.", "", "| name | description |", "|---|---|"]
    out += [f"| `{n}` | {cell(d)} |" for n, d in FAMILIES.items()]
    return "\n".join(out) + "\n"


def configs_page(repo: str) -> str:
    root = config.config_dir()
    names = config.shipped_configs()
    out = ["# Shipped configs", "",
           "Every gin file under `sparsejax/configs/` (the repository's `configs/`), with its",
           "opening comment. `--gin_file=NAME` finds them by these names from any directory;",
           "later files win, then `--gin.*` flags.", "",
           "| config | what it sets |", "|---|---|"]
    out += [f"| [`{n}`](#config-{slug(n)}) | {cell(opening_comment(root / n))} |" for n in names]
    for n in names:
        out += ["", f"(config-{slug(n)})=", f"## `{n}`", "",
                f"[source]({repo}/blob/main/sparsejax/configs/{n})", "",
                "```text", (root / n).read_text().rstrip(), "```"]
    return "\n".join(out) + "\n"


# --- gin configurables ---------------------------------------------------------------------

def configurables() -> dict[str, tuple[object, list[tuple[str, str, str]]]]:
    """{gin name: (the wrapped function or class, [(param, default, type)])} of every
    configurable defined in sparsejax or pallas_kernels, sorted by name."""
    config.register_configurables()
    out = {}
    for _, c in gin.config._REGISTRY.items():  # every registered configurable
        module = getattr(c.wrapped, "__module__", "") or ""
        if not module.startswith(PACKAGES):
            continue
        try:
            sig = inspect.signature(c.wrapped)
        except (TypeError, ValueError):
            continue
        params = []
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
                continue
            if c.allowlist and p.name not in c.allowlist:
                continue
            if c.denylist and p.name in c.denylist:
                continue
            default = "required" if p.default is p.empty else repr(p.default)
            hint = "" if p.annotation is p.empty else (
                p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(
                    p.annotation))
            params.append((p.name, default, hint))
        out[c.name] = (c.wrapped, params)
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def settings_table(names: list[str], table: dict | None = None) -> str:
    """A Markdown table of the parameters of the configurables `names` with their defaults."""
    table = configurables() if table is None else table
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"gin-settings: {missing} are not gin configurables of "
                         f"{PACKAGES}; valid: {sorted(table)}")
    rows = ["| setting | default | type |", "|---|---|---|"]
    for n in names:
        rows += [f"| [`{n}`](#gin-{slug(n)}).`{p}` | {code(d)} | {code(t)} |"
                 for p, d, t in table[n][1]]
    return "\n".join(rows)


def configurables_page() -> str:
    table = configurables()
    by_package: dict[str, list[str]] = {}
    for name, (obj, _) in table.items():
        package = ".".join(obj.__module__.split(".")[:2])
        by_package.setdefault(package, []).append(name)
    out = ["# Gin configurables", "",
           "Every `@gin.configurable` of `sparsejax` and `pallas_kernels`, with its parameters",
           "and their defaults (the values a run uses when no binding gives one; the run's",
           "`config.gin` records them all). Bind one as `Name.param = value` in a gin file or",
           "`--gin.Name.param=value`.", ""]
    for package in sorted(by_package):
        out += [f"- [`{package}`](#gin-package-{slug(package)}): " +
                ", ".join(f"[`{n}`](#gin-{slug(n)})" for n in by_package[package])]
    for package in sorted(by_package):
        out += ["", f"(gin-package-{slug(package)})=", f"## `{package}`"]
        for name in by_package[package]:
            obj, params = table[name]
            out += ["", f"(gin-{slug(name)})=", f"### `{name}`", "",
                    f"{cell(describe(obj))} ({code(_where(obj))})", ""]
            if params:
                out += ["| parameter | default | type |", "|---|---|---|"]
                out += [f"| `{p}` | {code(d)} | {code(t)} |" for p, d, t in params]
            else:
                out.append("No parameters.")
    return "\n".join(out) + "\n"


# --- benchmarks, copied pages ----------------------------------------------------------------

def benchmarks_page() -> str:
    out = ["# Benchmarks", "",
           "One script per measured claim under `benchmarks/`; each prints a table and, last, a",
           "JSON line of ratios against a baseline timed in the same run, and names the device.",
           "`--quick` sizes them for a CPU. The figures measured so far are quoted in the",
           "guides, next to the feature they measure.", ""]
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out += [f"## `benchmarks/{path.name}`", "", "```text", doc.strip(), "```", ""]
    return "\n".join(out)


def _rewrite_links(text: str, source: Path, target: Path, copied: dict[Path, Path],
                   repo: str) -> str:
    """Relative links of `source` (a repository file) as seen from its copy `target`."""
    def fix(m: re.Match) -> str:
        label, href = m.groups()
        if re.match(r"[a-z]+:|#", href):
            return m.group(0)
        path, _, anchor = href.partition("#")
        resolved = (source.parent / path).resolve()
        if resolved in copied:
            rel = Path(os.path.relpath(copied[resolved], target.parent)).as_posix()
        else:
            rel = f"{repo}/blob/main/{resolved.relative_to(ROOT).as_posix()}"
        return f"{label}({rel}{'#' + anchor if anchor else ''})"
    return LINK.sub(fix, text)


def copied_pages() -> dict[Path, Path]:
    """{repository file: its copy under docs/generated/}."""
    results = OUT / "results"
    pages = {ROOT / "experiments" / "README.md": results / "index.md",
             ROOT / "tpu" / "README.md": OUT / "tpu.md"}
    for p in sorted((ROOT / "experiments" / "results").iterdir()):
        if p.suffix in (".md", ".png"):
            pages[p] = results / p.name
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        pages[p] = OUT / "notebooks" / p.name
    return {k.resolve(): v for k, v in pages.items()}


def _write(path: Path, data: str | bytes) -> None:
    """Writes only what changed, so an incremental build rereads only changed pages."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_bytes() if path.exists() else None
    new = data.encode() if isinstance(data, str) else data
    if old != new:
        path.write_bytes(new)


def write_pages(app: object = None) -> None:
    """Writes docs/generated/ (connected to Sphinx's builder-inited; `app` is unused)."""
    repo = repository_url()
    pages = {"cli.md": cli_page(), "registries.md": registries_page(),
             "configs.md": configs_page(repo), "configurables.md": configurables_page(),
             "benchmarks.md": benchmarks_page()}
    for name, text in pages.items():
        _write(OUT / name, text)
    copied = copied_pages()
    for source, target in copied.items():
        if source.suffix == ".md":
            text = _rewrite_links(source.read_text(), source, target, copied, repo)
            if target.name == "index.md":  # the reproductions' pages, found by the build
                text += "\n```{toctree}\n:hidden:\n:glob:\n\n*\n```\n"
            _write(target, text)
        else:
            _write(target, source.read_bytes())
    wanted = set(copied.values()) | {OUT / n for n in pages}
    for path in OUT.rglob("*"):  # a page whose source is gone goes too
        if path.is_file() and path not in wanted:
            path.unlink()


def setup(app) -> dict:
    """Sphinx's entry point (this module imports no Sphinx, so tests can read its pages)."""
    app.connect("builder-inited", write_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
