"""``make_method(name)``: named presets of the sparsity methods (gin-configurable).

A preset fixes only what defines the method (criterion, schedule type, growth);
everything else comes from the classes' gin bindings or defaults, e.g.::

    make_method.name = 'rigl'
    MaskedPruningMethod.density = 0.1
    DropGrowSchedule.frequency = 100

Keyword arguments passed in Python override the preset.
"""
from __future__ import annotations

from typing import Any, Callable

import gin

from sparsejax.sparsity import schedules as s
from sparsejax.sparsity.finetune import SparseFinetuneMethod
from sparsejax.sparsity.method import DenseMethod, SparsityMethod
from sparsejax.sparsity.nm_methods import LearnedNMMethod, SRSTEMethod
from sparsejax.sparsity.pruning import MaskedPruningMethod


def _pruning(**preset: Any) -> Callable[..., SparsityMethod]:
    def build(**kw: Any) -> SparsityMethod:
        args = {k: (v() if callable(v) and k == "schedule" else v) for k, v in preset.items()}
        args.update(kw)
        return MaskedPruningMethod(**args)

    return build


def _bound_or(parameter: str, default: Any) -> Any:
    """The gin binding of ``parameter`` if there is one (so gin can change a preset value)."""
    try:
        value = gin.query_parameter(parameter)
    except ValueError:
        return default
    return default if value is None else value


PRESETS: dict[str, Callable[..., SparsityMethod]] = {
    "dense": lambda **kw: DenseMethod(**kw),
    "static_random": _pruning(schedule=s.ConstantSchedule, init_criterion="random"),
    "static_magnitude": _pruning(schedule=s.ConstantSchedule, init_criterion="magnitude"),
    "magnitude_oneshot": _pruning(schedule=s.OneShotSchedule, criterion="magnitude"),
    "gmp": _pruning(schedule=s.PolynomialSchedule, criterion="magnitude"),
    "global_gmp": _pruning(schedule=s.PolynomialSchedule, criterion="global_magnitude"),
    "movement": _pruning(schedule=s.PolynomialSchedule, criterion="movement"),
    "average_density": _pruning(schedule=s.AverageDensitySchedule, criterion="magnitude"),
    "snip": _pruning(schedule=s.OneShotSchedule, criterion="snip"),
    "set": _pruning(schedule=s.DropGrowSchedule, init_criterion="random", grow="random"),
    "rigl": _pruning(schedule=s.DropGrowSchedule, init_criterion="random", grow="gradient"),
    "spdf": _pruning(schedule=s.SparseThenDenseSchedule, init_criterion="random"),
    "nm": lambda **kw: _pruning(schedule=s.OneShotSchedule, nm=_bound_or("MaskedPruningMethod.nm", (2, 4)))(**kw),
    "srste": lambda **kw: SRSTEMethod(**kw),
    "learned_nm": lambda **kw: LearnedNMMethod(**kw),
    "lt_sft": lambda **kw: SparseFinetuneMethod(**{"mode": "lt_sft", **kw}),
    "spiel": lambda **kw: SparseFinetuneMethod(**{"mode": "spiel", **kw}),
}


@gin.configurable
def make_method(name: str = "dense", **kwargs: Any) -> SparsityMethod:
    """Builds the sparsity method ``name`` (one of ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"name: {name!r} is not a sparsity method; valid: {sorted(PRESETS)}")
    return PRESETS[name](**kwargs)
