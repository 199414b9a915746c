"""One kernel of a block: pruned with the run's pruner (each expert of a stacked MoE kernel on
its own routed tokens), refined by DSnoT if asked, and its record for the prune report with
the reconstruction error tr(ΔᵀHΔ) on the calibration tokens."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.sparsity.posttrain import stats as stats_lib
from sparsejax.sparsity.posttrain.dsnot import DSnoT
from sparsejax.sparsity.posttrain.plan import Plan


def prune_kernel(plan: Plan, path: str, kernel: jax.Array, calib, density: float,
                 valid) -> tuple[jax.Array, jax.Array, dict]:
    """Prunes one kernel (each expert of a stacked [E, in, out] kernel on its own)."""
    pc = plan.config
    t0 = time.perf_counter()
    if kernel.ndim == 3:
        outs = [prune_kernel(plan, path, kernel[e], expert_calibration(calib, e), density, None)
                for e in range(kernel.shape[0])]
        w = jnp.stack([o[0] for o in outs])
        keep = jnp.stack([o[1] for o in outs])
        swaps = sum(o[2].get("dsnot_swaps", 0) for o in outs)
        info = {"dsnot_swaps": swaps} if pc.dsnot else {}
        info["seconds"] = time.perf_counter() - t0
        return w, keep, info
    if plan.global_masks is not None:
        keep = plan.global_masks[path]
        w = jnp.where(keep, kernel, jnp.zeros_like(kernel))
    else:
        w, keep = plan.pruner.prune(plan.solve_layout(kernel), calib, density=density,
                                    structure=plan.structure, valid=valid)
    info = {}
    if pc.dsnot:
        w, keep, swaps = DSnoT().refine(kernel, w, keep, calib, pc.nm_pair)
        if valid is not None:
            keep = keep & valid
            w = jnp.where(keep, w, jnp.zeros_like(w))
        info["dsnot_swaps"] = int(jnp.sum(swaps))
    w = jax.block_until_ready(w)
    info["seconds"] = time.perf_counter() - t0
    return w, keep, info


def expert_calibration(calib: stats_lib.LayerCalibration, e: int) -> stats_lib.LayerCalibration:
    return stats_lib.LayerCalibration(jax.tree.map(lambda a: a[e], calib.stats),
                                      None if calib.grad_sq is None else calib.grad_sq[e],
                                      calib.num_samples)


@jax.jit
def _error_sums(kernel, pruned, hessian):
    f = lambda a, b: jnp.einsum("...ij,...ik,...kj->", a, hessian, b)
    d = (kernel - pruned).astype(jnp.float32)
    k = kernel.astype(jnp.float32)
    return f(d, d), f(k, k)


def reconstruction_errors(kernel, pruned, calib) -> tuple[float, float]:
    """(tr(Δᵀ H Δ), relative to tr(Wᵀ H W)) over the calibration tokens."""
    err, base = (float(x) for x in _error_sums(kernel, pruned, calib.stats.hessian))
    return err, err / max(base, 1e-30)


def layer_record(plan: Plan, path: str, kernel, pruned, keep, calib, info) -> dict:
    err, rel = reconstruction_errors(kernel, pruned, calib)
    v = plan.valid_of(path)
    density = float(np.asarray(keep).sum()) / (keep.size if v is None else float(np.asarray(v).sum()))
    return dict(path=path, shape=list(kernel.shape),
                target_density=round(plan.densities[path], 6), density=density,
                recon_error=err, recon_error_rel=rel, **info)
