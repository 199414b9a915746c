"""Expert parallelism on 8 simulated CPU devices against the single-device result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from sparsejax.models.moe import dispatch as D
from sparsejax.models.moe import router as R
from sparsejax.models.moe.expert_parallel import buffer_capacity, expert_parallel_ffn
from sparsejax.models.moe.experts import ExpertWeights

TOL = dict(rtol=2e-4, atol=2e-5)
E, K, D_, F = 8, 2, 16, 32


def _mesh(shape, names=("data", "expert")):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _problem(t, skew, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (t, D_))
    offset = jnp.array([4.0, 3.0] + [0.0] * (E - 2)) if skew else 0.0
    logits = jax.random.normal(keys[1], (t, E)) + offset
    w = ExpertWeights(jax.random.normal(keys[2], (E, D_, F)) / 4,
                      jax.random.normal(keys[3], (E, D_, F)) / 4,
                      jax.random.normal(keys[4], (E, F, D_)) / 6)
    return x, R.softmax_topk(logits, K), w, logits


def _ep(mesh, x, r, w, **kw):
    t = r.num_tokens

    def f(x, w):
        y, dropped = expert_parallel_ffn(x, r.expert_index.reshape(t, K), r.weight.reshape(t, K),
                                         r.mask.reshape(t, K), w, num_experts=E, mesh=mesh, **kw)
        return jnp.sum(y * y), (y, dropped)
    with jax.set_mesh(mesh):
        (_, (y, dropped)), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w)
    return y, dropped, g


def _local(x, r, w):
    def f(x, w):
        y, _ = D.grouped_dispatch(x, r, w)
        return jnp.sum(y * y), y
    (_, y), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
    return y, g


@pytest.mark.parametrize("exchange", ["all_to_all", "ragged_emulated"])
@pytest.mark.parametrize("skew", [False, True])
def test_expert_parallel_equals_single_device(exchange, skew):
    x, r, w, logits = _problem(64, skew)
    mesh = _mesh((2, 4))
    y, dropped, g = _ep(mesh, x, r, w, exchange=exchange, capacity_factor=float(E))  # no drops
    y_ref, g_ref = _local(x, r, w)
    assert float(dropped) == 0
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, **TOL)


def test_buffer_mode_drops_like_onehot_per_shard():
    """Skewed routing with capacity 1.0: overflow is dropped exactly as the onehot reference
    would drop it on each device's tokens, and counted."""
    t, shards = 64, 8
    x, r, w, logits = _problem(t, skew=True, seed=1)
    mesh = _mesh((2, 4))
    y, dropped, _ = _ep(mesh, x, r, w, exchange="all_to_all", capacity_factor=1.0)
    cap = buffer_capacity(t // shards, K, E, 1.0)
    ys, drops = [], 0.0
    ts = t // shards
    for i in range(shards):
        ri = R.softmax_topk(logits[i * ts:(i + 1) * ts], K)
        yi, di = D.onehot_dispatch(x[i * ts:(i + 1) * ts], ri, w, cap)
        ys.append(yi)
        drops += float(di)
    assert drops > 0
    assert float(dropped) == drops
    np.testing.assert_allclose(y, jnp.concatenate(ys), **TOL)


def test_tensor_and_fsdp_axes():
    """4-axis mesh: experts over 'expert', mlp over 'tensor', tokens over data/fsdp/expert."""
    x, r, w, logits = _problem(32, skew=True, seed=2)
    mesh = _mesh((1, 2, 2, 2), ("data", "fsdp", "tensor", "expert"))
    y, dropped, g = _ep(mesh, x, r, w, exchange="all_to_all", capacity_factor=float(E))
    y_ref, g_ref = _local(x, r, w)
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, **TOL)


def test_bad_expert_axis():
    x, r, w, logits = _problem(16, skew=False)
    mesh = _mesh((1, 8))
    t = r.num_tokens
    with pytest.raises(ValueError, match="num_experts=6"):
        expert_parallel_ffn(x, r.expert_index.reshape(t, K), r.weight.reshape(t, K),
                            r.mask.reshape(t, K), w, num_experts=6, mesh=mesh)


@pytest.mark.gpu
def test_ragged_all_to_all_on_gpu():
    """The real ragged_all_to_all (GPU/TPU only) on whatever devices exist (1 GPU: expert=1)."""
    n = len(jax.devices())
    x, r, w, logits = _problem(16 * n, skew=True)
    mesh = _mesh((1, n))
    y, dropped, g = _ep(mesh, x, r, w, exchange="ragged")
    y_ref, g_ref = _local(x, r, w)
    np.testing.assert_allclose(y, y_ref, rtol=2e-3, atol=2e-4)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
