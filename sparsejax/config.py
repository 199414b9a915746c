"""Gin parsing for every entry point: the shipped configs, plug-in imports, bindings from the
command line, and the errors a user sees when one of them is wrong.

    config_text = parse_gin(["tiny.gin", "sparsity/rigl.gin"], ["TrainConfig.num_steps=500"])

Gin files are looked up as given, then among the configs that ship inside the package
(`sparsejax/configs/`, also reachable as `configs/` at the top of the repository), so a
non-editable install runs the README's commands from any directory.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import os
import pkgutil
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import gin

import pallas_kernels
import sparsejax

def config_dir() -> Path:
    """The directory of the shipped gin files (package data of `sparsejax`)."""
    return Path(str(importlib.resources.files("sparsejax") / "configs"))


def shipped_configs() -> list[str]:
    """Names of every shipped gin file, relative to `config_dir()` ('sparsity/rigl.gin')."""
    root = config_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gin"))


_REGISTERED = False


# Modules that register no configurable or plug-in and import an optional extra: left out of
# register_configurables, so that no command needs (or waits for) that extra.
OPTIONAL_MODULES = ("sparsejax.interop.lm_eval_model",)  # lm_eval ([eval])


def register_configurables() -> None:
    """Imports every module of sparsejax and pallas_kernels (but OPTIONAL_MODULES), so that
    every gin configurable and every registered plug-in exists before any binding is
    parsed."""
    global _REGISTERED
    if _REGISTERED:
        return
    for pkg in (sparsejax, pallas_kernels):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if mod.name not in OPTIONAL_MODULES:
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


def _guard_resource_reader() -> None:
    """gin's package-resource reader raises a TypeError for an include whose first directory
    is a namespace package of the working directory (`include 'experiments/small.gin'` run
    from the repository root, where `experiments/` is one); such a path is simply not a
    package resource, so its check answers False instead."""
    readers = gin.config._FILE_READERS
    for i, (reader, exists) in enumerate(readers):
        if getattr(exists, "__module__", "") == "gin.resource_reader":
            def safe(path, _exists=exists):
                try:
                    return _exists(path)
                except TypeError:
                    return False
            safe.__module__ = __name__
            readers[i] = (reader, safe)


WORKDIR_SOURCE = "the workdir's config.gin"
_SOURCES: dict[str, str] = {}  # binding key -> where the parse that last set it came from
_IMPORTS: list[str] = []


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              imports: Sequence[str] = (), workdir_config: str | None = None) -> str:
    """Parses `workdir_config` (a run's saved config.gin, when resuming), then gin files and
    `A.b=V` bindings (later ones win); unknown or malformed bindings raise a ValueError naming
    them. Remembers which file or flag set each binding (`binding_sources`). Returns the parsed
    config text."""
    register_configurables()
    import_plugins(imports)
    _guard_resource_reader()
    gin.clear_config()
    _SOURCES.clear()
    _IMPORTS[:] = list(imports)
    gin.add_config_file_search_path(str(config_dir()))
    gin.add_config_file_search_path(os.getcwd())
    files = [(workdir_config, WORKDIR_SOURCE)] if workdir_config else []
    files += [(resolve_gin_file(f), f"--gin_file={f}") for f in gin_files]
    for path, source in files:
        before = parsed_bindings()
        try:
            gin.parse_config_file(path)
        except (ValueError, KeyError, IOError, SyntaxError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"gin file {path}: {msg}") from None
        _record_sources(before, source)
    for b in bindings:
        before = parsed_bindings()
        try:
            gin.parse_config(b)
        except (ValueError, KeyError, SyntaxError) as e:
            raise _binding_error(b, e) from None
        _record_sources(before, f"--gin.{b}")
    gin.finalize()
    return gin.config_str()


# --- the operative config -----------------------------------------------------------------


def _bindings_of(configuration) -> dict[str, str]:
    """{'scope/Configurable.param': repr(value)} of a gin configuration dict."""
    out = {}
    for (scope, selector), params in configuration.items():
        for name, value in params.items():
            out[gin.config._format_binding_key(scope, selector, name)] = repr(value)
    return out


def parsed_bindings() -> dict[str, str]:
    """Every binding parsed so far (from files and flags), as `key -> repr(value)`."""
    return _bindings_of(gin.config._CONFIG)


def operative_bindings() -> dict[str, str]:
    """Every value the run used so far (defaults included), as `key -> repr(value)`."""
    with gin.config._OPERATIVE_CONFIG_LOCK:
        return _bindings_of(gin.config._OPERATIVE_CONFIG)


def _record_sources(before: dict[str, str], source: str) -> None:
    for key, value in parsed_bindings().items():
        if before.get(key) != value:
            _SOURCES[key] = source


def given(key: str) -> bool:
    """Whether the user's gin files or flags bind `key` ('MoeMlp.capacity_factor') in the
    config parsed now (a workdir's saved config does not count: it lists every value)."""
    return key in parsed_bindings() and _SOURCES.get(key, WORKDIR_SOURCE) != WORKDIR_SOURCE


def refuse_given(key: str, why: str) -> None:
    """A ValueError if the user gave `key` although it has no effect (`why` says why)."""
    if given(key):
        raise ValueError(f"{key} is given ({_SOURCES[key]}) but has no effect: {why}")


def binding_sources() -> dict[str, str]:
    """{binding key: the file or flag that set it} of the last `parse_gin`."""
    return dict(_SOURCES)


def operative_config_text() -> str:
    """The operative config as a gin file: plug-in imports first, then every value used."""
    imports = "".join(f"import {m}\n" for m in _IMPORTS)
    return (imports + "\n" if imports else "") + gin.operative_config_str()


def unused_bindings() -> dict[str, str]:
    """{key: source} of bindings given in a gin file or flag that the run never used (a
    configurable that was not called, or a parameter it never read). The workdir's own
    config.gin is left out: it may hold settings of commands other than this one."""
    used = operative_bindings()
    return {k: src for k, src in _SOURCES.items()
            if src != WORKDIR_SOURCE and k not in used}


def check_unused_bindings(allow: bool = False) -> dict[str, str]:
    """Raises a ValueError naming every given binding that took no effect (unless `allow`,
    for sweeps whose shared bindings concern some trials only); returns them."""
    unused = unused_bindings()
    if unused and not allow:
        lines = "; ".join(f"{k} (from {src})" for k, src in sorted(unused.items()))
        raise ValueError(f"these bindings have no effect on this run, so it is refused: {lines}. "
                         f"Their configurable is never called with this config (e.g. a schedule "
                         f"the method does not use) or the parameter is passed explicitly; "
                         f"remove them")
    return unused


# Bindings a resumed run may change without --allow_config_change: how the run is driven,
# not what it computes.
RESUME_SAFE = (r"^TrainConfig\.(progress_bar|log_every|eval_every|checkpoint_every|"
               r"keep_checkpoints|async_checkpoints|max_skipped_steps)$",
               r"^make_mesh\.", r"^attention_kernel\.", r"^pallas_gmm\.",
               r"^gmm_default_tiling\.", r"^gmm_gpu_compiler_params\.",
               r"^make_dataset\.(num_threads|prefetch_buffer_size)$", r"^train\.config$")


def config_changes(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """Lines `key: saved -> now` for every binding that differs (resume-safe ones left out):
    values both runs used, and values given now that the saved run did not use."""
    out = []
    given = {k for k, src in _SOURCES.items() if src != WORKDIR_SOURCE}
    for key in sorted((set(saved) & set(now)) | (set(now) & given)):
        if any(re.search(p, key) for p in RESUME_SAFE):
            continue
        a, b = saved.get(key, "(unset)"), now.get(key, "(unset)")
        if a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


# --- run-relative steps -------------------------------------------------------------------


def check_step_spec(value, setting: str, minimum: int = 0) -> int | float:
    """Validates a step given as an absolute int (>= minimum) or as a float fraction of the
    run's length in [0, 1]; returns it unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{setting}={value!r} must be an int (an absolute step) or a float in "
                         f"[0, 1] (a fraction of TrainConfig.num_steps)")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{setting}={value!r}: a float is a fraction of "
                             f"TrainConfig.num_steps and must be in [0, 1]; give an int for an "
                             f"absolute step")
    elif value < minimum:
        raise ValueError(f"{setting}={value!r} must be >= {minimum}")
    return value


def run_step(value, num_steps: int, setting: str, minimum: int = 0) -> int:
    """An absolute step from `value`: an int as given, a float as round(value * num_steps)
    (at least `minimum`)."""
    check_step_spec(value, setting, minimum)
    if isinstance(value, float):
        return max(minimum, int(round(value * num_steps)))
    return int(value)


# --- type checks of config dataclasses ----------------------------------------------------


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def check_field_types(obj: Any) -> None:
    """Raises a ValueError naming the first field of dataclass `obj` whose value does not
    have the annotated type (e.g. `TrainConfig.num_steps='20'` or `num_layers=2.5`)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints.get(f.name, Any)
        if not _matches(value, hint):
            raise ValueError(f"{type(obj).__name__}.{f.name}={value!r} has type "
                             f"{type(value).__name__}; expected {_type_name(hint)}")
