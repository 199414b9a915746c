"""Layer pruners: how one 2-D kernel [in, out] becomes sparse given its calibration. Registered
by name in `PRUNERS` (`PruneConfig.method = 'sparsegpt'`; `sparsejax list` prints them).

Score-based pruners are a registered criterion (CRITERIA) plus a registered structure
(STRUCTURES), the same pieces sparse training uses: magnitude (|w|; per layer
'unstructured', per output unit 'per_output', over all layers 'global', 'nm', 'block'),
Wanda (|w|·‖X_j‖₂, 'per_output' by default) and GBLM-Pruner (Wanda plus |w|·‖G‖₂ of the
calibration gradients). SparseGPT solves for the remaining weights as well (sparsegpt.py;
'unstructured' or 'nm').
"""
from __future__ import annotations

import functools
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.registry import Registry
from sparsejax.sparsity import structures as struct_lib
from sparsejax.sparsity.criteria import CRITERIA
from sparsejax.sparsity.posttrain import sparsegpt

PyTree = Any


class Pruner:
    """Base: prunes one kernel [in, out]; returns (kernel with exact zeros, keep mask)."""

    needs_calibration: bool = True  # needs LayerCalibration (input statistics)
    needs_grads: bool = False       # needs the calibration gradients (the training loss)
    structures: tuple[str, ...] = ("unstructured", "per_output", "nm", "block")
    default_structure: str = "per_output"

    def prune(self, kernel: jax.Array, calib: Any, *, density: float,
              structure: struct_lib.Structure, valid: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def scores(self, kernel: jax.Array, calib: Any) -> jax.Array:
        """Importance of each weight (higher: keep); used for OWL outlier ratios too."""
        raise NotImplementedError


PRUNERS: Registry[type[Pruner]] = Registry("post-training pruner")


def select_keep(scores: jax.Array, count: jax.Array, structure: struct_lib.Structure,
                valid: jax.Array | None = None) -> jax.Array:
    """The keep mask of one kernel from its scores: `count` entries kept, as `structure`
    selects them (N:M: its own count); jittable (`count` may be traced)."""
    ones = jnp.ones(scores.shape, bool)
    keep = structure.select({"w": scores}, {"w": ones}, {"w": count}, scale=1.0,
                            alive_only=False, valid=None if valid is None else {"w": valid})["w"]
    return keep if valid is None else keep & valid


def keep_count(density: float, shape: tuple[int, ...], valid: jax.Array | None,
               structure: struct_lib.Structure | None = None) -> jax.Array:
    """The kept count of one kernel as an int32 array (traced into the selection):
    round(density * real entries); with 'per_output', every output unit prunes
    floor(real inputs * sparsity) of its inputs (sparsity = 1 - density), as the Wanda
    reference does (`int(W.shape[1] * sparsity_ratio)` per row), so when that product is not
    an integer a unit keeps the larger share."""
    if isinstance(structure, struct_lib.PerOutput):
        if valid is None:  # PerOutput's units: the last axis; its inputs: all the others
            fan_in, units = int(np.prod(shape[:-1])), shape[-1]
        else:
            v = np.asarray(valid).reshape(-1, shape[-1])
            fan_in, units = int(v.sum(axis=0).max()), int(v.any(axis=0).sum())
        # the sparsity as configured: 1 - (1 - s) can differ from s in the last bit
        sparsity = round(1.0 - float(density), 12)
        return jnp.asarray((fan_in - int(fan_in * sparsity)) * units, jnp.int32)
    size = int(np.prod(shape)) if valid is None else int(np.asarray(valid).sum())
    return jnp.asarray(round(density * size), jnp.int32)


_SCORE_FNS: dict = {}


def _settings_key(obj: Any) -> tuple:
    return (type(obj).__name__, tuple(sorted((k, repr(v)) for k, v in vars(obj).items())))


def _score_prune_fn(criterion: str, structure: struct_lib.Structure):
    """A jitted (kernel, calib, count, valid) -> (kernel, keep) per criterion and structure
    settings (their gin values included), so each kernel shape compiles once."""
    crit = CRITERIA.get(criterion, "PruneConfig.method")()
    key = (criterion, _settings_key(crit), _settings_key(structure))
    if key not in _SCORE_FNS:
        def fn(kernel, calib, count, valid):
            scores = crit.scores({"w": kernel}, state=None if calib is None else {"w": calib})
            keep = select_keep(scores["w"], count, structure, valid)
            return jnp.where(keep, kernel, jnp.zeros_like(kernel)), keep

        _SCORE_FNS[key] = jax.jit(fn)
    return _SCORE_FNS[key]


class ScorePruner(Pruner):
    """Keep the highest scores of a registered criterion, with a registered structure."""

    criterion: str = "magnitude"

    def scores(self, kernel, calib):
        crit = CRITERIA.get(self.criterion, "PruneConfig.method")()
        return crit.scores({"w": kernel}, state=None if calib is None else {"w": calib})["w"]

    def prune(self, kernel, calib, *, density, structure, valid=None):
        fn = _score_prune_fn(self.criterion, structure)
        count = keep_count(density, kernel.shape, valid, structure)
        return fn(kernel, calib, count, valid)


@PRUNERS.register("magnitude")
class MagnitudePruner(ScorePruner):
    """|w| (no calibration); per layer, per output unit, global, N:M or block."""

    criterion = "magnitude"
    needs_calibration = False
    structures = ("unstructured", "per_output", "global", "nm", "block")
    default_structure = "unstructured"


@PRUNERS.register("wanda")
class WandaPruner(ScorePruner):
    """|w| * ‖x_j‖₂ compared per output unit (Wanda, Sun et al. 2023). Each unit prunes
    floor(in * sparsity) of its inputs, as the reference code (`int(W.shape[1] *
    sparsity_ratio)` per row): at in = 10 and sparsity 0.55 it prunes 5 and keeps 5 (see
    `keep_count`). A dead input (‖x_j‖₂ = 0) scores 0 and is pruned first."""

    criterion = "wanda"


@PRUNERS.register("gblm")
class GBLMPruner(ScorePruner):
    """Wanda + |w| * ‖calibration gradient‖₂, per output unit (GBLM-Pruner, Das et al.)."""

    criterion = "gblm"
    needs_grads = True


@functools.partial(jax.jit, static_argnames=("dampening", "block_size", "n", "m"))
def _sparsegpt(kernel, hessian, sparsity, *, dampening, block_size, n, m):
    return sparsegpt.solve_kernel(kernel, hessian, dampening=dampening, block_size=block_size,
                                  sparsity=sparsity, n=n, m=m)


@PRUNERS.register("sparsegpt")
class SparseGPTPruner(Pruner):
    """OBS solve of the kept weights on XᵀX + λI, mask chosen per column block (SparseGPT)."""

    structures = ("unstructured", "nm")
    default_structure = "unstructured"

    def __init__(self):
        self.settings = sparsegpt.SparseGPTSettings()

    def check(self, path: str, shape: tuple[int, ...], structure: struct_lib.Structure) -> None:
        """N:M groups must not straddle column blocks: M must divide the block size."""
        if isinstance(structure, struct_lib.NMStructure):
            bsz = min(self.settings.block_size, shape[-2])
            if bsz % structure.m:
                raise ValueError(f"SparseGPTSettings.block_size={self.settings.block_size}: "
                                 f"params[{path!r}] has {shape[-2]} inputs, so blocks of "
                                 f"{bsz} columns, not a multiple of M={structure.m}; choose a "
                                 f"block size that is")

    def scores(self, kernel, calib):
        """SparseGPT's pruning cost w² / [U]_jj² (before any update; 0 for dead inputs,
        whose weights the solve zeroes)."""
        h = calib.stats.hessian
        u = sparsegpt.hessian_inverse_factor(h, self.settings.dampening)
        w = jnp.where(sparsegpt.dead_inputs(h)[:, None], 0.0, kernel.astype(jnp.float32))
        return w ** 2 / jnp.diagonal(u)[:, None] ** 2

    def prune(self, kernel, calib, *, density, structure, valid=None):
        n, m = (structure.n, structure.m) if isinstance(structure, struct_lib.NMStructure) \
            else (0, 0)
        w, keep = _sparsegpt(kernel, calib.stats.hessian, jnp.float32(1.0 - density),
                             dampening=self.settings.dampening,
                             block_size=self.settings.block_size, n=n, m=m)
        if valid is not None:
            keep = keep & valid
            w = jnp.where(keep, w, jnp.zeros_like(w))
        return w, keep


def make_structure(name: str, nm: tuple[int, int] | None = None,
                   compact: bool = False) -> struct_lib.Structure:
    """A registered structure by name; 'nm' built with the given (N, M) along the inputs;
    `compact` (PruneConfig.compact): 'block' with a constant fan-in (per_column)."""
    if name == "nm":
        if nm is None:
            raise ValueError("PruneConfig.structure='nm' needs PruneConfig.nm='N:M' (e.g. '2:4')")
        return struct_lib.NMStructure(n=nm[0], m=nm[1], axis=-2)
    if compact:
        try:
            bound = gin.query_parameter("BlockStructure.per_column")
        except ValueError:  # not bound
            bound = True
        if bound is not True:
            raise ValueError(f"BlockStructure.per_column={bound!r} conflicts with "
                             f"PruneConfig.compact=True (--compact), which selects a constant "
                             f"fan-in (per_column=True)")
        return struct_lib.BlockStructure(per_column=True)
    return struct_lib.STRUCTURES.get(name, "PruneConfig.structure")()
