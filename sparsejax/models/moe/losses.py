"""Balancing losses and the auxiliary-loss-free bias update; all float32 over global arrays,
so a loss is the same number whatever the mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balance_loss(probs: jax.Array, expert_index: jax.Array, mask: jax.Array) -> jax.Array:
    """Switch load-balancing loss `E * sum_e f_e * P_e` over the whole batch.

    probs: [T, E] router distribution; expert_index, mask: [T, k] token-major assignments.
    f_e = fraction of the T*k active assignments that go to e; P_e = mean prob of e.
    Equals 1 for perfectly uniform routing.
    """
    e = probs.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(expert_index, e, dtype=jnp.float32)
                     * mask[..., None].astype(jnp.float32), axis=(0, 1))
    f = counts / jnp.maximum(jnp.sum(counts), 1.0)
    p = jnp.mean(probs.astype(jnp.float32), axis=0)
    return e * jnp.sum(f * p)


def sequence_load_balance_loss(probs: jax.Array, expert_index: jax.Array, mask: jax.Array,
                               batch: int) -> jax.Array:
    """The Switch loss computed per sequence and averaged (DeepSeek-V3 sequence-wise loss).

    probs: [batch*seq, E]; expert_index, mask: [batch*seq, k].
    """
    e = probs.shape[-1]
    p = probs.reshape(batch, -1, e)
    idx = expert_index.reshape(batch, -1, expert_index.shape[-1])
    m = mask.reshape(idx.shape)
    return jnp.mean(jax.vmap(load_balance_loss)(p, idx, m))


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


def aux_free_bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean_load - load).

    Under-loaded experts get a larger selection bias. Runs outside the gradient.
    bias, load: [E].
    """
    load = jax.lax.stop_gradient(load.astype(jnp.float32))
    new = bias.astype(jnp.float32) + rate * jnp.sign(jnp.mean(load) - load)
    return jax.lax.stop_gradient(new).astype(bias.dtype)
