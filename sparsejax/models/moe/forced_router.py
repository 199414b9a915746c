"""Forced-balance routing: tokens go to experts by a fixed rule, not by the router's scores,
so every expert gets (almost exactly) the same number of tokens. For benchmarking dispatch
and expert parallelism without router noise or imbalance; not for training a useful model
(the router's logits still feed the balancing losses, which then only train an unused
router kernel).

* 'round_robin': token t takes experts (t * k + j) mod E, j < k: exactly T * k / E tokens per
  expert when E divides T * k;
* 'random': each token takes k distinct experts drawn uniformly at random (the 'router' rng
  stream; a fixed key when none is given, e.g. in eval).

Each assignment's combine weight is 1 / k.
"""
from __future__ import annotations

import gin
import jax
import jax.numpy as jnp

from sparsejax.models.moe.router import ROUTERS, Router, Routing, _token_major

MODES = ("round_robin", "random")


def forced_balance(logits: jax.Array, k: int, mode: str = "round_robin",
                   rng: jax.Array | None = None) -> Routing:
    """Routing of T tokens (logits [T, E]) to k experts each by `mode` (module docstring)."""
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"MoeMlp.top_k={k} must be in [1, num_experts={e}]")
    if mode == "round_robin":
        idx = (jnp.arange(t)[:, None] * k + jnp.arange(k)[None, :]) % e
    elif mode == "random":
        rng = jax.random.key(0) if rng is None else rng
        idx = jax.lax.top_k(jax.random.uniform(rng, (t, e)), k)[1]
    else:
        raise ValueError(f"ForcedBalanceRouter.mode={mode!r} is unknown; valid: {MODES}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return _token_major(idx.astype(jnp.int32), jnp.full((t, k), 1.0 / k, jnp.float32),
                        jnp.ones((t, k), bool), probs)


@gin.configurable
@ROUTERS.register("forced_balance")
class ForcedBalanceRouter(Router):
    """Tokens to top_k experts round-robin or uniformly at random (`mode`), for benchmarks."""

    needs_rng = True

    def __init__(self, mode: str = "round_robin"):
        if mode not in MODES:
            raise ValueError(f"ForcedBalanceRouter.mode={mode!r} is unknown; valid: {MODES}")
        self.mode = mode

    def route(self, logits, *, top_k, capacity, bias=None, rng=None):
        if bias is not None:
            raise ValueError("MoeMlp.bias_update_rate / correction_bias steer selection, which "
                             "the forced_balance router does not do; set them to 0 / False")
        return forced_balance(logits, top_k, self.mode, rng if self.mode == "random" else None)
