"""The Monarch weight format: the product P L Pᵀ R against its dense matrix (forward and
gradients), the init's variance, the Frobenius projection from dense kernels, bad block
counts, Transformers built with it, and warm starts that convert dense checkpoints."""
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax.models.formats import WEIGHT_FORMATS, Projection, format_of
from sparsejax.models.formats.block_sparse import BlockSparse
from sparsejax.models.formats.monarch import Monarch, monarch_matmul
from sparsejax.models.layer_stack import unstack_layers
from sparsejax.models.transformer import ModelConfig, Transformer
from sparsejax.parallel.mesh import make_mesh
from sparsejax.parallel.rules import LOGICAL_RULES
from sparsejax.sparsity.layout import LAYOUT, merge_layout
from sparsejax.train.build import build_run
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.trainer import TrainConfig
from sparsejax.train.warm_start import warm_start
from sparsejax.train.workdir import PRETRAINED_DIR

SHAPES = [(64, 64, 4), (64, 64, 8), (64, 32, 4), (32, 96, 4), (48, 48, 4), (24, 40, 4)]
TOKENS = jax.random.randint(jax.random.key(0), (2, 16), 0, 259)
SMALL = dict(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
             max_seq_len=32)


def factors(in_features, features, nblocks, seed=0):
    right, left = Monarch(nblocks).draw(jax.random.key(seed), in_features, features,
                                        jnp.float32, None)
    return {"blkdiag1": right, "blkdiag2": left}


def permutation(n, b):
    """The matrix of P: v -> v.reshape(b, n/b).T.flatten()."""
    out = np.zeros((n, n))
    out[np.arange(n), np.arange(n).reshape(b, n // b).T.flatten()] = 1
    return out


def block_diag(blocks) -> np.ndarray:
    """The block-diagonal matrix of a sequence of 2-D blocks."""
    rows, cols = sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)
    out, i, j = np.zeros((rows, cols)), 0, 0
    for b in blocks:
        out[i:i + b.shape[0], j:j + b.shape[1]] = b
        i, j = i + b.shape[0], j + b.shape[1]
    return out


def frobenius(fmt, params, kernel):
    return float(np.linalg.norm(np.asarray(fmt.to_dense(params, kernel.shape[0])) - kernel))


@pytest.mark.parametrize("in_features,features,nblocks", SHAPES)
def test_to_dense_is_P_L_Pt_R_and_the_forward_multiplies_by_it(in_features, features,
                                                              nblocks):
    fmt, params = Monarch(nblocks), factors(in_features, features, nblocks)
    w = np.asarray(fmt.to_dense(params, in_features))  # [in, out]
    m = min(in_features, features)
    right = block_diag([np.asarray(b).T for b in params["blkdiag1"]])  # [m, in]
    left = block_diag([np.asarray(b).T for b in params["blkdiag2"]])  # [out, m]
    plptr = permutation(features, nblocks) @ left @ permutation(m, nblocks).T @ right
    np.testing.assert_allclose(w, plptr.T, atol=1e-6)
    x = jax.random.normal(jax.random.key(1), (3, 5, in_features))
    y = monarch_matmul(x, params["blkdiag1"], params["blkdiag2"], precision="highest")
    assert y.shape == (3, 5, features)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_features,features,nblocks", [(64, 32, 4), (32, 96, 4)])
def test_factor_gradients_equal_the_gradient_through_to_dense(in_features, features, nblocks):
    fmt, params = Monarch(nblocks), factors(in_features, features, nblocks)
    x = jax.random.normal(jax.random.key(2), (7, in_features))
    target = jax.random.normal(jax.random.key(3), (7, features))

    def loss(p, dense):
        y = (x @ fmt.to_dense(p, in_features) if dense else
             monarch_matmul(x, p["blkdiag1"], p["blkdiag2"], precision="highest"))
        return jnp.sum(jnp.sin(y) * target)

    g, g_dense = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
    for k in params:
        np.testing.assert_allclose(g[k], g_dense[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_features,features,nblocks", [
    (1024, 1024, 4), (512, 1536, 8), (1536, 512, 8), (1024, 1024, 32)])
def test_init_matches_the_dense_layer_variance(in_features, features, nblocks):
    """Var W_ij = 1 / in (the dense layer's variance_scaling(1, 'fan_in')): over >= 512k
    entries of one draw, within 5% (the spread over seeds is ~1-5%, the last case with one
    product per entry the widest); the mean is ~0."""
    fmt = Monarch(nblocks)
    w = np.asarray(fmt.to_dense(factors(in_features, features, nblocks, seed=11), in_features))
    assert abs(w.var() * in_features - 1.0) < 0.05
    assert abs(w.mean()) * np.sqrt(in_features) < 0.01


def test_padded_output_columns_start_at_zero():
    fmt = Monarch(4)
    right, left = fmt.draw(jax.random.key(0), 32, 64, jnp.float32, real_features=37)
    w = np.asarray(fmt.to_dense({"blkdiag1": right, "blkdiag2": left}, 32))
    assert np.all(w[:, 37:] == 0) and np.all(np.abs(w[:, :37]).sum(0) > 0)


@pytest.mark.parametrize("in_features,features,nblocks", SHAPES)
def test_projection_recovers_a_monarch_matrix(in_features, features, nblocks):
    fmt = Monarch(nblocks)
    w = np.asarray(fmt.to_dense(factors(in_features, features, nblocks, seed=4), in_features))
    projected = fmt.from_dense(w)
    assert {k: v.shape for k, v in projected.items()} == {
        k: v.shape for k, v in factors(in_features, features, nblocks).items()}
    np.testing.assert_allclose(fmt.to_dense(projected, in_features), w, atol=1e-5)


@pytest.mark.parametrize("in_features,features,nblocks", [(16, 16, 4), (64, 32, 4),
                                                          (48, 48, 4)])
def test_projection_of_a_dense_matrix_is_a_local_optimum(in_features, features, nblocks):
    """No small perturbation of the projected factors lowers the Frobenius error, and no
    random Monarch matrix (even least-squares scaled) comes near it."""
    fmt = Monarch(nblocks)
    w = np.asarray(jax.random.normal(jax.random.key(5), (in_features, features)))
    projected = fmt.from_dense(w)
    best = frobenius(fmt, projected, w)
    assert best < np.linalg.norm(w)
    rng = np.random.default_rng(0)
    for _ in range(20):
        moved = {k: v + 1e-3 * rng.standard_normal(v.shape).astype(np.float32)
                 for k, v in projected.items()}
        assert frobenius(fmt, moved, w) >= best - 1e-5
    for seed in range(20):
        d = np.asarray(fmt.to_dense(factors(in_features, features, nblocks, seed), in_features))
        scaled = d * np.sum(d * w) / np.sum(d * d)
        assert np.linalg.norm(scaled - w) > best


def test_relative_projection_error_on_a_trained_like_layer():
    """A trained-like kernel: a decaying spectrum (singular values ~ 1/sqrt(i)) with a
    low-rank part, the shape of an MLP up projection. Monarch keeps 2 * 256 * 256 / 4 of its
    256 * 1024 entries; the printed relative error is what the warm start starts from."""
    rng = np.random.default_rng(0)
    n, k = 256, 1024
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((k, n)))
    s = 1 / np.sqrt(np.arange(1, n + 1))
    w = ((u * s) @ v.T).astype(np.float32)
    for nblocks in (4, 16):
        fmt = Monarch(nblocks)
        rel = frobenius(fmt, fmt.from_dense(w), w) / np.linalg.norm(w)
        noise = np.asarray(jax.random.normal(jax.random.key(6), (n, k)))
        rel_noise = frobenius(fmt, fmt.from_dense(noise), noise) / np.linalg.norm(noise)
        print(f"nblocks={nblocks}: relative Frobenius error {rel:.3f} on the trained-like "
              f"kernel, {rel_noise:.3f} on Gaussian noise")
        assert rel < rel_noise < 1


@pytest.mark.parametrize("nblocks", [0, -2, 2.0, True, "4"])
def test_bad_nblocks_is_refused(nblocks):
    with pytest.raises(ValueError, match="Monarch.nblocks"):
        Monarch(nblocks)


def test_nblocks_that_does_not_divide_the_projection_is_refused():
    with pytest.raises(ValueError, match=r"Monarch.nblocks=3 .*in_features=64 and features=32"):
        Monarch(3).from_dense(np.zeros((64, 32), np.float32))
    gin.bind_parameter("Monarch.nblocks", 3)
    with pytest.raises(ValueError, match=r"Monarch.nblocks=3 .*'layer_0/attn/query'.*"
                                         r"in_features=32 and features=32"):
        Transformer(ModelConfig(**SMALL, weight_format="monarch")).init(jax.random.key(0),
                                                                       TOKENS)


def test_a_mesh_that_cannot_split_the_blocks_is_refused():
    train = TrainConfig(global_batch_size=8, seq_len=16)
    cfg = ModelConfig(**SMALL, weight_format_overrides={"mlp/": "monarch"})
    with pytest.raises(ValueError, match=r"Monarch.nblocks=4 .*fsdp\*tensor=8"):
        build_run(train, cfg, make_mesh(fsdp=8))
    Monarch(4).check_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    Monarch(8).check_mesh({"fsdp": 8, "tensor": 1})


def test_registered_with_its_param_names_and_block_axes():
    assert WEIGHT_FORMATS.get("monarch") is Monarch
    proj = Projection(32, ("embed", "mlp"), formats=ModelConfig(
        weight_format="monarch").formats(), name="wi")
    boxed = proj.init(jax.random.key(0), jnp.zeros((2, 64)))["params"]
    assert format_of(nn.meta.unbox(boxed)) == "monarch"
    assert {k: (v.names, v.value.shape) for k, v in boxed.items()} == {
        "blkdiag1": (("out_blocks", None, None), (4, 16, 8)),
        "blkdiag2": (("out_blocks", None, None), (4, 8, 8))}


def loss_fn(cfg):
    model = Transformer(cfg)

    def loss(params):
        logits = model.apply({"params": params}, TOKENS)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1))

    return loss


def test_transformer_with_monarch_projections_trains():
    cfg = ModelConfig(**SMALL, weight_format="monarch")
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(1), TOKENS)["params"])
    layer = params["layer_0"]
    for name in ("query", "key", "value", "out"):
        assert format_of(layer["attn"][name]) == "monarch"
    for name in ("wi_gate", "wi_up", "wo"):
        assert format_of(layer["mlp"][name]) == "monarch"
    assert format_of(params["lm_head"]) == "dense"
    loss, grads = jax.value_and_grad(loss_fn(cfg))(params)
    assert np.isfinite(loss) and abs(loss - np.log(259)) < 1.0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["layer_0"]["mlp"]["wo"]["blkdiag1"]).sum()) > 0


def test_override_keeps_attention_dense():
    cfg = ModelConfig(**SMALL, weight_format_overrides={"mlp/": "monarch"})
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(1), TOKENS)["params"])
    for i in range(2):
        attention, mlp = params[f"layer_{i}"]["attn"], params[f"layer_{i}"]["mlp"]
        assert all(getattr(attention[n], "ndim", 0) == 2 for n in ("query", "key", "value",
                                                                    "out"))
        assert all(set(mlp[n]) == {"blkdiag1", "blkdiag2"} for n in ("wi_gate", "wi_up", "wo"))
    assert np.isfinite(loss_fn(cfg)(params))


def test_block_sparse_projection_keeps_the_largest_blocks():
    fmt = BlockSparse(block_in=8, block_out=8, density=0.25)
    w = np.array(jax.random.normal(jax.random.key(7), (32, 16)))
    assert fmt.from_dense(w)["indices"].shape == (2, 4)  # exact: every block is nonzero
    w[8:16, :8] = 0
    with pytest.raises(ValueError, match="project=True"):
        fmt.from_dense(w)  # 3 nonzero blocks in the first column, 4 in the second
    out = fmt.from_dense(w, project=True)
    norms = np.linalg.norm(w.reshape(4, 8, 2, 8), axis=(1, 3))  # [in_blocks, out_blocks]
    np.testing.assert_array_equal(np.asarray(out["indices"])[:, 0], norms.argmax(0))
    kept = np.asarray(fmt.to_dense(out, 32))
    assert np.count_nonzero(kept) == 2 * 64
    np.testing.assert_array_equal(kept[kept != 0], w[kept != 0])


@pytest.mark.parametrize("target,source", [("monarch", "checkpoint"), ("monarch", "imported"),
                                           ("block_sparse", "checkpoint")])
def test_warm_start_converts_a_dense_model(tmp_path, target, source):
    """A dense run's checkpoint (or a workdir of imported params) warm-starts a scanned model
    in another format (convert_formats): every converted projection is from_dense of the
    dense kernel (block-sparse: the largest blocks, its layout moved to the sparsity state);
    everything else is copied."""
    gin.bind_parameter("BlockSparse.block_in", 8)
    gin.bind_parameter("BlockSparse.block_out", 8)
    gin.bind_parameter("BlockSparse.density", 0.5)
    train = TrainConfig(global_batch_size=4, seq_len=16)
    src = build_run(train, ModelConfig(**SMALL), make_mesh(num_devices=1))
    with jax.set_mesh(src.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = src.init_state()
    if source == "checkpoint":
        ckpt = Checkpointer(str(tmp_path / "src" / "checkpoints"), async_save=False)
        ckpt.save(1, state, None, {"step": 1})
        ckpt.close()
    else:  # as `sparsejax import-hf` writes them
        with ocp.StandardCheckpointer() as saver:
            saver.save(str(tmp_path / "src" / PRETRAINED_DIR), {"params": state.params})
    dense = jax.device_get(state.params)
    dst = build_run(train, ModelConfig(**SMALL, weight_format_overrides={"mlp/": target},
                                       scan_layers=True), make_mesh(num_devices=1))
    with jax.set_mesh(dst.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        fresh = dst.init_state()
        with pytest.raises(ValueError, match="another shape"):
            warm_start(fresh, dst.state_shardings.params, from_workdir=str(tmp_path / "src"),
                       mode="params")
        with pytest.raises(ValueError, match="mode='params'"):
            warm_start(fresh, dst.state_shardings.params, from_workdir=str(tmp_path / "src"),
                       convert_formats=True)
        started = warm_start(fresh, dst.state_shardings.params,
                             from_workdir=str(tmp_path / "src"), mode="params",
                             convert_formats=True)
    got = unstack_layers(jax.device_get(started.params))
    if target == "block_sparse":
        got = merge_layout(got, unstack_layers(jax.device_get(started.sparsity[LAYOUT])))
    fmt = WEIGHT_FORMATS.get(target)()
    for i in range(2):
        for name in ("wi_gate", "wi_up", "wo"):
            kernel = dense[f"layer_{i}"]["mlp"][name]["kernel"]
            want = (fmt.from_dense(kernel, project=True) if target == "block_sparse"
                    else fmt.from_dense(kernel))
            for k, v in want.items():
                np.testing.assert_allclose(got[f"layer_{i}"]["mlp"][name][k], v, atol=1e-6)
        np.testing.assert_array_equal(got[f"layer_{i}"]["attn"]["query"],
                                      dense[f"layer_{i}"]["attn"]["query"])
    np.testing.assert_array_equal(got["lm_head"]["kernel"], dense["lm_head"]["kernel"])
    x = jnp.asarray(TOKENS)
    logits = dst.model.apply({"params": dst.sparsity_method.forward_params(
        started.params, started.sparsity)}, x)
    assert bool(jnp.all(jnp.isfinite(logits)))
