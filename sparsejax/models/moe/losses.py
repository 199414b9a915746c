"""Balancing losses and the auxiliary-loss-free bias update; all float32 (counts int32) over
global arrays, so a loss is the same number whatever the mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp


LOAD_BALANCE_NORMALIZATIONS = ("assignments", "tokens")


def _check_normalization(normalization: str) -> None:
    if normalization not in LOAD_BALANCE_NORMALIZATIONS:
        raise ValueError(f"MoeMlp.load_balance_normalization={normalization!r}; valid: "
                         f"{LOAD_BALANCE_NORMALIZATIONS}")


def expert_counts(expert_index: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
    """Exact int32 number of active assignments per expert: [E]. expert_index, mask: any shape."""
    return jnp.zeros((num_experts,), jnp.int32).at[expert_index.reshape(-1)].add(
        mask.reshape(-1).astype(jnp.int32))


def load_balance_loss(probs: jax.Array, expert_index: jax.Array, mask: jax.Array,
                      normalization: str = "assignments") -> jax.Array:
    """Switch load-balancing loss `E * sum_e f_e * P_e` over the whole batch.

    probs: [T, E] router distribution; expert_index, mask: [T, k] token-major assignments.
    P_e = mean over tokens of the probability of e. f_e depends on `normalization`:

    * "assignments" (default): f_e = count_e / (number of active assignments), so f sums to 1
      and perfectly uniform routing gives 1 for every top_k (Switch's k=1 value; DeepSeek-V3's
      f_i = E / (k T) * count_i gives the same sum);
    * "tokens": f_e = count_e / T, the fraction of tokens routed to e (HF Transformers'
      Mixtral/Qwen-MoE `load_balancing_loss_func`), so f sums to top_k and uniform routing
      gives top_k: a coefficient published for that code is top_k times ours.
    """
    counts = expert_counts(expert_index, mask, probs.shape[-1])
    return load_balance_from_counts(probs, counts, expert_index.shape[0], normalization)


def load_balance_from_counts(probs: jax.Array, counts: jax.Array, num_tokens: jax.Array | int,
                             normalization: str = "assignments") -> jax.Array:
    """`E * sum_e f_e * P_e` with f from `counts` [E] (assignments per expert, no gradient) of
    `num_tokens` tokens and P_e the mean of `probs` [T, E] over its tokens.

    With the counts of the whole global batch and the probs of one micro-batch this is the
    global-batch load-balance loss (Qiu et al. 2025, "Demons in the detail"): averaged over
    equal micro-batches it equals, value and gradient, the loss of the un-split batch, since
    f carries no gradient and P is a mean over tokens."""
    _check_normalization(normalization)
    counts = jax.lax.stop_gradient(counts).astype(jnp.float32)
    total = (jnp.sum(counts) if normalization == "assignments"
             else jnp.asarray(num_tokens, jnp.float32))
    f = counts / jnp.maximum(total, 1.0)
    p = jnp.mean(probs.astype(jnp.float32), axis=0)
    return probs.shape[-1] * jnp.sum(f * p)


def sequence_load_balance_loss(probs: jax.Array, expert_index: jax.Array, mask: jax.Array,
                               batch: int, normalization: str = "assignments") -> jax.Array:
    """The Switch loss computed per sequence and averaged (DeepSeek-V3 sequence-wise loss).

    probs: [batch*seq, E]; expert_index, mask: [batch*seq, k]; normalization as in
    `load_balance_loss`.
    """
    e = probs.shape[-1]
    p = probs.reshape(batch, -1, e)
    idx = expert_index.reshape(batch, -1, expert_index.shape[-1])
    m = mask.reshape(idx.shape)
    return jnp.mean(jax.vmap(lambda a, b, c: load_balance_loss(a, b, c, normalization))(p, idx, m))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [T, E]."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(z * z)


def _entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def router_entropy(probs: jax.Array) -> jax.Array:
    """Mean per-token entropy of the router distribution (nats). probs: [T, E]."""
    return jnp.mean(_entropy(probs.astype(jnp.float32)))


def concentration_loss(probs: jax.Array) -> jax.Array:
    """ModuleFormer load-concentration loss: minus the mutual information between tokens and
    experts, `-(H(mean_t p(e|t)) - mean_t H(p(e|t)))`. Minimizing it spreads load over experts
    (high marginal entropy) while making each token concentrate on few (low conditional
    entropy). probs: [T, E]."""
    p = probs.astype(jnp.float32)
    return -(_entropy(jnp.mean(p, axis=0)) - jnp.mean(_entropy(p)))


def relu_sparsity_loss(gates: jax.Array) -> jax.Array:
    """L1 regularizer on ReLU router gates (ReMoE): mean over tokens of sum_e gate. [T, E]."""
    return jnp.mean(jnp.sum(jnp.abs(gates.astype(jnp.float32)), axis=-1))


def aux_free_bias_update(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean_count - count).

    Under-loaded experts get a larger selection bias, over-loaded ones a smaller one, and an
    expert exactly at the mean load keeps its bias. The sign is taken from exact integer
    counts, `sign(total - E * count)` (computed via `divmod(total, E)`, so int32 never
    overflows), because float fractions compared with their float mean give ±rate at exactly
    balanced loads. Runs outside the gradient.
    bias: [E]; counts: [E] integer assignments per expert (`expert_counts`).
    """
    if not jnp.issubdtype(counts.dtype, jnp.integer):
        raise ValueError(f"counts must be integer assignment counts per expert (expert_counts), "
                         f"got dtype {counts.dtype}")
    counts = jax.lax.stop_gradient(counts).astype(jnp.int32)
    # mean = q + r / E with 0 <= r < E; comparing with q and r never forms E * count (int32).
    q, r = jnp.divmod(jnp.sum(counts), counts.shape[-1])
    direction = jnp.where(counts < q, 1.0, jnp.where(counts > q, -1.0, jnp.where(r == 0, 0.0, 1.0)))
    new = bias.astype(jnp.float32) + rate * direction
    return jax.lax.stop_gradient(new).astype(bias.dtype)
