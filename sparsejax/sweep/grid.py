"""Sweep specs: which gin files, which bindings to sweep over which values, how many seeds.

A spec comes from CLI flags (`--gin_file`, `--sweep='A.b=[v1, v2]'`, `--seeds=3`, `--gin.X=V`)
or from a grid file (`--grid=experiments/grids/NAME.grid`); flags given with `--grid` are
added to the file's settings (gin files appended, sweeps added, overrides appended, `--seeds`
replaces the file's seed count).

Grid file format (one statement per line; `#` starts a comment; blank lines are ignored)::

    # RigL density sweep on the tiny model
    gin_file = tiny.gin                        # repeatable; path or name under configs/
    gin_file = sparsity/rigl.gin
    seeds = 3                                  # seeds 0..2 (bound as TrainConfig.seed)
    sweep: MaskedPruningMethod.density = [0.1, 0.2, 0.5]
    sweep: MaskedPruningMethod.distribution = ['uniform', 'erk']
    TrainConfig.num_steps = 100                # any other `A.b = value` is a fixed override

`sweep: gin_file = ['sparsity/rigl.gin', 'sparsity/set.gin']` sweeps over gin files (each
trial stacks its value after the fixed gin files): the way to compare preset methods.

Values are gin literals (numbers, 'strings', True/False/None, @references, lists in
brackets); a sweep list is split at its top-level commas, so `[[1, 2], [3, 4]]` sweeps two
list values. `seeds` may also be an explicit list, `seeds = [0, 7]`.

The grid is the cartesian product of the sweep lists (first sweep varies slowest) times
the seeds; every trial gets a stable, filesystem-safe name such as `density=0.1,seed=0`.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any, Sequence

SEED_BINDING = "TrainConfig.seed"
GIN_FILE = "gin_file"  # a sweep over gin files rather than over a binding
_BINDING_RE = re.compile(r"^[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*$")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One training run of the grid: a grid point plus a seed."""

    name: str
    point: tuple[tuple[str, str], ...]  # ((binding, value literal), ...) in sweep order
    seed: int

    @property
    def point_name(self) -> str:
        return point_name(self.point)

    def bindings(self) -> list[str]:
        """The trial's own gin bindings (`A.b=V`), seed last."""
        return [f"{b}={v}" for b, v in self.point if b != GIN_FILE] + [
            f"{SEED_BINDING}={self.seed}"]

    def gin_files(self) -> list[str]:
        """The gin files the trial stacks after the sweep's own (from `sweep: gin_file`)."""
        return [v.strip("'\"") for b, v in self.point if b == GIN_FILE]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Everything that defines a sweep (and so must match when a sweep dir is resumed)."""

    gin_files: tuple[str, ...]
    sweeps: tuple[tuple[str, tuple[str, ...]], ...]  # ((binding, (v1, v2, ...)), ...)
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()  # fixed `A.b=V` bindings applied to every trial

    def __post_init__(self):
        if not self.gin_files:
            raise ValueError("gin_files: a sweep needs at least one --gin_file (or gin_file = "
                             "... in the grid file)")
        if not self.sweeps:
            raise ValueError("sweeps: give at least one --sweep='Binding.name=[v1, v2]'")
        seen = set()
        for binding, values in self.sweeps:
            if binding != GIN_FILE and not _BINDING_RE.match(binding):
                raise ValueError(f"sweep binding {binding!r} is not of the form "
                                 "Configurable.parameter (optionally scope/Configurable.param)")
            if binding in seen:
                raise ValueError(f"sweep binding {binding!r} is swept twice")
            seen.add(binding)
            if not values:
                raise ValueError(f"sweep {binding!r} has an empty value list; give at least "
                                 f"one value, e.g. {binding}=[1, 2]")
            if len(set(values)) != len(values):
                raise ValueError(f"sweep {binding!r} repeats a value: {list(values)}")
        if SEED_BINDING in seen:
            raise ValueError(f"sweep binding {SEED_BINDING!r}: seeds are set with --seeds "
                             "(or `seeds = N` in a grid file), not swept")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={list(self.seeds)}: need at least one seed, no repeats")

    def to_json(self) -> dict[str, Any]:
        return {"gin_files": list(self.gin_files),
                "sweeps": [[b, list(v)] for b, v in self.sweeps],
                "seeds": list(self.seeds), "overrides": list(self.overrides)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SweepSpec":
        return cls(gin_files=tuple(d["gin_files"]),
                   sweeps=tuple((b, tuple(v)) for b, v in d["sweeps"]),
                   seeds=tuple(int(s) for s in d["seeds"]), overrides=tuple(d["overrides"]))

    def points(self) -> list[tuple[tuple[str, str], ...]]:
        """Grid points in order: the cartesian product of the sweep lists."""
        names = [b for b, _ in self.sweeps]
        return [tuple(zip(names, combo)) for combo in
                itertools.product(*(vals for _, vals in self.sweeps))]

    def trials(self) -> list[Trial]:
        """Every (grid point, seed), with unique names."""
        out, used = [], set()
        for point in self.points():
            for seed in self.seeds:
                name = f"{point_name(point)},seed={seed}"
                if name in used:  # two values that sanitize alike: disambiguate by index
                    name = f"{name},n{len(out)}"
                used.add(name)
                out.append(Trial(name=name, point=point, seed=seed))
        return out


def short_key(binding: str) -> str:
    """'scope/ModelConfig.num_layers' -> 'num_layers' (the column/name a reader wants)."""
    return "config" if binding == GIN_FILE else binding.rsplit(".", 1)[-1]


def _safe(text: str) -> str:
    text = text.strip().strip("'\"")
    return re.sub(r"[^A-Za-z0-9._+\-]+", "_", text).strip("_") or "_"


def point_name(point: Sequence[tuple[str, str]]) -> str:
    """Filesystem-safe name of a grid point, e.g. 'num_layers=1,density=0.5'."""
    keys = [short_key(b) for b, _ in point]
    if len(set(keys)) != len(keys):  # two sweeps share a parameter name: use the full binding
        keys = [_safe(b) for b, _ in point]
    return ",".join(f"{k}={_safe(gin_file_label(v) if b == GIN_FILE else v)}"
                    for k, (b, v) in zip(keys, point))


def gin_file_label(value: str) -> str:
    """'sparsity/rigl.gin' -> 'rigl': how a swept gin file is named in trials and tables."""
    return Path(value.strip("'\"")).stem


def split_list(text: str, what: str) -> tuple[str, ...]:
    """'[1, 'a,b', [2, 3]]' -> ('1', "'a,b'", '[2, 3]'): a bracketed gin list split at its
    top-level commas (values stay gin literal text)."""
    s = text.strip()
    if not (s.startswith("[") and s.endswith("]")):
        raise ValueError(f"{what}: expected a bracketed list like [v1, v2], got {text!r}")
    items, depth, quote, cur = [], 0, "", []
    for ch in s[1:-1]:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{what}: unbalanced brackets in {text!r}")
        elif ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise ValueError(f"{what}: unterminated quote or bracket in {text!r}")
    last = "".join(cur).strip()
    if last:
        items.append(last)
    if any(not it for it in items):
        raise ValueError(f"{what}: empty entry in {text!r}")
    return tuple(items)


def parse_sweep_flag(flag: str) -> tuple[str, tuple[str, ...]]:
    """'A.b=[v1, v2]' -> ('A.b', ('v1', 'v2'))."""
    if "=" not in flag:
        raise ValueError(f"--sweep={flag!r}: expected Binding.name=[v1, v2, ...]")
    binding, values = flag.split("=", 1)
    binding = binding.strip()
    return binding, split_list(values, f"--sweep {binding}")


def parse_seeds(text: str | int) -> tuple[int, ...]:
    """'3' -> (0, 1, 2); '[0, 7]' or '0,7' -> (0, 7)."""
    s = str(text).strip()
    try:
        if s.startswith("["):
            return tuple(int(x) for x in split_list(s, "seeds"))
        if "," in s:
            return tuple(int(x) for x in s.split(","))
        n = int(s)
    except ValueError:
        raise ValueError(f"seeds={text!r}: expected a count (3) or a list ([0, 7])") from None
    if n < 1:
        raise ValueError(f"seeds={text!r}: need at least 1 seed")
    return tuple(range(n))


def _strip_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def parse_grid_text(text: str, source: str = "<grid>") -> dict[str, Any]:
    """Parses a grid file's text into {'gin_files', 'sweeps', 'seeds', 'overrides'}
    (seeds None when the file sets none). Errors name the file and line."""
    gin_files, sweeps, overrides, seeds = [], [], [], None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        is_sweep = line.startswith("sweep:")
        body = line[len("sweep:"):].strip() if is_sweep else line
        if "=" not in body:
            raise ValueError(f"{where}: expected `key = value`, got {raw.strip()!r}")
        key, value = (x.strip() for x in body.split("=", 1))
        if not value:
            raise ValueError(f"{where}: {key!r} has no value")
        if is_sweep:
            sweeps.append((key, split_list(value, f"{where} sweep {key}")))
        elif key == "gin_file":
            gin_files.append(value.strip("'\""))
        elif key == "seeds":
            try:
                seeds = parse_seeds(value)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        elif _BINDING_RE.match(key) and "." in key:
            overrides.append(f"{key}={value}")
        else:
            raise ValueError(f"{where}: unknown key {key!r}; valid: gin_file, seeds, "
                             "`sweep: A.b = [..]` or a gin binding `A.b = value`")
    return {"gin_files": gin_files, "sweeps": sweeps, "seeds": seeds, "overrides": overrides}


def load_grid_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--grid={path!r}: no such file")
    return parse_grid_text(p.read_text(), str(path))


def build_spec(gin_files: Sequence[str] = (), sweep_flags: Sequence[str] = (),
               seeds: str | int | None = None, overrides: Sequence[str] = (),
               grid_file: str | None = None) -> SweepSpec:
    """A SweepSpec from CLI-style inputs, optionally on top of a grid file."""
    base = load_grid_file(grid_file) if grid_file else {
        "gin_files": [], "sweeps": [], "seeds": None, "overrides": []}
    sweeps = list(base["sweeps"]) + [parse_sweep_flag(f) for f in sweep_flags]
    seed_tuple = parse_seeds(seeds) if seeds is not None else (base["seeds"] or (0,))
    return SweepSpec(gin_files=tuple(base["gin_files"]) + tuple(gin_files),
                     sweeps=tuple(sweeps), seeds=seed_tuple,
                     overrides=tuple(base["overrides"]) + tuple(overrides))


def spec_diff(old: SweepSpec, new: SweepSpec) -> str:
    """Human-readable difference between two specs ('' when equal)."""
    a, b = old.to_json(), new.to_json()
    return "; ".join(f"{k}: stored {json.dumps(a[k])} vs now {json.dumps(b[k])}"
                     for k in a if a[k] != b[k])
