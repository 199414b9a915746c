"""Gin parsing for every entry point: the shipped configs, plug-in imports, bindings from the
command line, and the errors a user sees when one of them is wrong.

    config_text = parse_gin(["tiny.gin", "sparsity/rigl.gin"], ["TrainConfig.num_steps=500"])

Gin files are looked up as given, then among the configs that ship inside the package
(`sparsejax/configs/`, also reachable as `configs/` at the top of the repository), so a
non-editable install runs the README's commands from any directory.
"""
from __future__ import annotations

import importlib
import importlib.resources
import os
import pkgutil
import re
from pathlib import Path
from typing import Sequence

import gin

def config_dir() -> Path:
    """The directory of the shipped gin files (package data of `sparsejax`)."""
    return Path(str(importlib.resources.files("sparsejax") / "configs"))


def shipped_configs() -> list[str]:
    """Names of every shipped gin file, relative to `config_dir()` ('sparsity/rigl.gin')."""
    root = config_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gin"))


_REGISTERED = False


def register_configurables() -> None:
    """Imports every module of sparsejax and pallas_kernels, so that every gin configurable
    and every registered plug-in exists before any binding is parsed."""
    global _REGISTERED
    if _REGISTERED:
        return
    import pallas_kernels
    import sparsejax
    for pkg in (sparsejax, pallas_kernels):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(mod.name)
    _REGISTERED = True


def import_plugins(modules: Sequence[str]) -> None:
    """Imports user modules that register criteria, routers, ... (`--import=MODULE`)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"--import={name!r} cannot be imported: {e}; the module must be on "
                             f"the Python path (PYTHONPATH) or installed") from None


def resolve_gin_file(name: str) -> str:
    """A gin file given as a path, or by name among the shipped configs."""
    root = config_dir()
    shipped = name[len("configs/"):] if name.startswith("configs/") else name
    for cand in (Path(name), root / shipped, root / f"{shipped}.gin"):
        if cand.is_file():
            return str(cand)
    raise ValueError(f"--gin_file={name!r} not found (looked in the working directory and "
                     f"among the shipped configs in {root}; `sparsejax list` prints them)")


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates --gin.A.b=V flags (gin bindings) from ordinary flags."""
    bindings, rest = [], []
    for a in argv:
        if a.startswith("--gin.") and "=" in a:
            bindings.append(a[len("--gin."):])
        else:
            rest.append(a)
    return bindings, rest


def _binding_error(binding: str, err: Exception) -> ValueError:
    """A one-line message for a binding gin could not parse (no gin/Python traceback)."""
    name, _, value = binding.partition("=")
    name, value = name.strip(), value.strip()
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, SyntaxError) or "could not parse" in msg.lower() or \
            "malformed" in msg.lower() or "invalid syntax" in msg.lower():
        if re.fullmatch(r"[A-Za-z_][\w./-]*", value):
            return ValueError(f"gin binding {name}={value}: the value is not a Python literal; "
                              f"strings need quotes, e.g. --gin.{name}=\"'{value}'\"")
        return ValueError(f"gin binding {name}={value}: the value is not a Python literal or "
                          f"gin reference ({msg})")
    return ValueError(f"gin binding {name}={value} is not valid: {msg}")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              imports: Sequence[str] = ()) -> str:
    """Parses gin files and `A.b=V` bindings (later ones win); unknown or malformed bindings
    raise a ValueError naming them. Returns the parsed config text."""
    register_configurables()
    import_plugins(imports)
    gin.clear_config()
    gin.add_config_file_search_path(str(config_dir()))
    gin.add_config_file_search_path(os.getcwd())
    files = [resolve_gin_file(f) for f in gin_files]
    for f in files:
        try:
            gin.parse_config_file(f)
        except (ValueError, KeyError, IOError, SyntaxError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"gin file {f}: {msg}") from None
    for b in bindings:
        try:
            gin.parse_config(b)
        except (ValueError, KeyError, SyntaxError) as e:
            raise _binding_error(b, e) from None
    gin.finalize()
    return gin.config_str()
