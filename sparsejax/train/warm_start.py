"""Start a new run from another run's parameters: sparse upcycling (dense MLP -> MoE experts)
or a plain parameter copy (e.g. dense fine-tuning of a sparse pre-trained model)."""
from __future__ import annotations

from typing import Any

import gin
import jax

from sparsejax.train.checkpoint import restore_state_numpy
from sparsejax.train.state import TrainState

MODES = ("upcycle", "params")


def restore_params(workdir: str) -> tuple[int, Any]:
    """(step, params as numpy arrays) of the latest checkpoint in `workdir`."""
    try:
        step, state = restore_state_numpy(workdir)
    except ValueError as e:
        raise ValueError(f"warm_start.from_workdir: {e}") from None
    return step, state["params"]


@gin.configurable(denylist=["resumed"])
def warm_start(state: TrainState, param_shardings: Any, from_workdir: str | None = None,
               mode: str = "upcycle", *, resumed: bool = False) -> TrainState:
    """Replaces the freshly initialized params of `state` with ones built from the latest
    checkpoint of `from_workdir` (no-op when it is None). Optimizer state stays fresh.

    Called on every start; a resumed run (`resumed`) keeps its restored state, since it
    started from `from_workdir` already."""
    if mode not in MODES:
        raise ValueError(f"warm_start.mode={mode!r} is unknown; valid: {MODES}")
    if from_workdir is None or resumed:
        return state
    _, source = restore_params(from_workdir)
    template = jax.device_get(state.params)
    if mode == "upcycle":
        from sparsejax.models.moe.upcycle import upcycle_params
        params = upcycle_params(source, template, jax.random.key(0))
    else:
        src = {"/".join(map(str, k)): v.shape for k, v in _flat(source)}
        dst = {"/".join(map(str, k)): v.shape for k, v in _flat(template)}
        if src != dst:
            bad = sorted(set(src.items()) ^ set(dst.items()))[:3]
            raise ValueError(f"warm_start.from_workdir={from_workdir!r} has params of another "
                             f"shape (e.g. {bad}); mode='params' needs the same model")
        params = source
    params = jax.tree.map(lambda p, t: p.astype(t.dtype), params, template)
    return state.replace(params=jax.device_put(params, param_shardings))


def _flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(tree).items()
