"""Param path names and the choice of which params are prunable.

A param is named by its path, e.g. ``"params/Dense_0/kernel"``. Only kernels of
rank >= 2 whose path matches none of the default exclude regexes are pruned by
default; user regexes can force params in (``include``) or out (``exclude``).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax

PyTree = Any

# Embeddings, norms, biases and MoE routers are never pruned by default.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"embed", r"norm", r"bias", r"router", r"scale")


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """Joins a jax key path into ``"a/b/c"``."""
    return "/".join(_key_name(k) for k in path)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """[(path string, leaf)] in tree-flatten order (``None`` leaves are skipped)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), x) for p, x in leaves]


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``jax.tree.map`` that also passes the path string of each leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest)


def _search(patterns: Sequence[str], path: str) -> bool:
    return any(re.search(p, path, flags=re.IGNORECASE) for p in patterns)


def check_patterns_match(patterns: Sequence[str], paths: Sequence[str], arg: str) -> None:
    """Raises ``ValueError`` for a user regex that matches no param path."""
    for p in patterns:
        try:
            rx = re.compile(p, flags=re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"{arg}: {p!r} is not a valid regex ({e})") from e
        if not any(rx.search(path) for path in paths):
            raise ValueError(
                f"{arg}: regex {p!r} matches no param; param paths are {sorted(paths)}"
            )


def prunable_tree(
    params: PyTree,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    default_exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> PyTree:
    """Pytree of bools mirroring ``params``: True where the param may be pruned.

    Precedence: ``exclude`` > ``include`` > ``default_exclude`` > rank >= 2.
    """
    include, exclude = tuple(include), tuple(exclude)
    paths = [p for p, _ in named_leaves(params)]
    check_patterns_match(include, paths, "include")
    check_patterns_match(exclude, paths, "exclude")

    def decide(path: str, x: Any) -> bool:
        if _search(exclude, path):
            return False
        if _search(include, path):
            return True
        if _search(default_exclude, path):
            return False
        return len(getattr(x, "shape", ())) >= 2

    tree = map_with_path(decide, params)
    if not any(jax.tree.leaves(tree)):
        raise ValueError(
            "params: no prunable params (kernels of rank >= 2 not matching "
            f"{tuple(default_exclude) + exclude}); param paths are {sorted(paths)}. "
            "Use include=[regex] to select params to prune."
        )
    return tree


def regex_lookup(table: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """First value in ``table`` whose regex key matches ``path``."""
    for rx, value in table.items():
        if re.search(rx, path, flags=re.IGNORECASE):
            return value
    return default
