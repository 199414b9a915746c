"""Training-free activation thresholding (TEAL, CATS, WINA), calibrated per layer.

Each method puts a threshold at some *sites* of the model (models/thresholds.py): entries
whose score is at or below it become exactly zero. Thresholds are calibrated per site so that
a fraction `target` of the calibration set's scores falls at or below them:

* `teal` (Liu et al., 2024): score |x| of the hidden state entering each named projection
  (q, k, v, o of attention; gate, up, down of dense MLPs; default all of them).
* `wina` (Chen et al., 2025): score |x_i| * ||W_i||, the magnitude weighted by the norm of the
  weight row it multiplies (a column of the Hugging Face [out, in] weight); same projections.
* `cats` (Lee et al., 2024): score |act(gate(x))| of each dense MLP's gate activation; the
  up and down projections then see zeros there. Its only projection is 'gate'.

Settings (`Thresholding`): `method` ('none' turns it off; then no other setting may be
given), `target` in [0, 1) (required), `projections` (None: the method's default), the
calibration sample (`calibration_tokens` of training rows, default 16384, read in the order
of `calibration_seed`). Routed experts have no sites: naming an MLP
projection on a model with MoE layers is refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import gin
import jax.numpy as jnp
import numpy as np

from sparsejax.models.thresholds import BIN_EDGES, Site
from sparsejax.registry import Registry

# projection name -> (module under layer_i, site name, kernel path under layer_i)
PROJECTIONS = {
    "q": ("attn", "query_in", "attn/query"), "k": ("attn", "key_in", "attn/key"),
    "v": ("attn", "value_in", "attn/value"), "o": ("attn", "out_in", "attn/out"),
    "gate": ("mlp", "wi_gate_in", "mlp/wi_gate/kernel"), "up": ("mlp", "wi_up_in", "mlp/wi_up/kernel"),
    "down": ("mlp", "wo_in", "mlp/wo/kernel"),
}
ALL = ("q", "k", "v", "o", "gate", "up", "down")


class Thresholder:
    """A thresholding method: which sites it uses and how it scores entries there."""

    valid_projections: tuple[str, ...] = ALL
    default_projections: tuple[str, ...] = ALL

    def site_name(self, projection: str) -> str:
        return PROJECTIONS[projection][1]

    def scale(self, projection: str, layer_params: Mapping[str, Any], width: int) -> np.ndarray:
        """Per-feature score scale of the site's input (ones: plain magnitude)."""
        return np.ones((width,), np.float32)

    def width(self, projection: str, layer_params: Mapping[str, Any]) -> int:
        """Features entering the site (the kernel's input dim)."""
        return int(np.shape(_kernel(layer_params, PROJECTIONS[projection][2]))[0])


THRESHOLDERS: Registry[type[Thresholder]] = Registry("activation thresholding")


@THRESHOLDERS.register("teal")
class Teal(Thresholder):
    """TEAL: magnitude threshold on the hidden state entering each projection."""


@THRESHOLDERS.register("wina")
class Wina(Thresholder):
    """WINA: threshold on |x| times the norm of the weight row each entry multiplies."""

    def scale(self, projection, layer_params, width):
        kernel = np.asarray(_kernel(layer_params, PROJECTIONS[projection][2]), np.float32)
        return np.linalg.norm(kernel, axis=1).astype(np.float32)  # [in]


@THRESHOLDERS.register("cats")
class Cats(Thresholder):
    """CATS: magnitude threshold on the MLP gate activation act(gate(x))."""

    valid_projections = ("gate",)
    default_projections = ("gate",)

    def site_name(self, projection):
        return "gate_act"

    def width(self, projection, layer_params):
        return int(np.shape(_kernel(layer_params, "mlp/wi_gate/kernel"))[1])  # [mlp]


def _kernel(layer_params: Mapping[str, Any], path: str) -> Any:
    node = layer_params
    for part in path.split("/"):
        node = node[part]
    return node


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Thresholding:
    """Training-free thresholding at eval (`sparsejax eval`) and sampling (`sparsejax sample`)."""

    method: str = "none"
    target: float | None = None
    projections: tuple | None = None
    calibration_tokens: int | None = None
    calibration_seed: int | None = None

    def __post_init__(self):
        if self.method == "none":
            given = [f for f in ("target", "projections", "calibration_tokens", "calibration_seed")
                     if getattr(self, f) is not None]
            if given:
                raise ValueError(f"Thresholding.{given[0]}={getattr(self, given[0])!r} has no "
                                 f"effect with Thresholding.method='none'; set a method "
                                 f"({THRESHOLDERS.names()}) or remove it")
            return
        THRESHOLDERS.get(self.method, "Thresholding.method")
        if self.target is None:
            raise ValueError(f"Thresholding.method={self.method!r} needs Thresholding.target "
                             f"(a sparsity in [0, 1))")
        check_target(self.target, "Thresholding.target")
        if self.calibration_tokens is not None and (
                isinstance(self.calibration_tokens, bool) or not isinstance(self.calibration_tokens, int)
                or self.calibration_tokens < 1):
            raise ValueError(f"Thresholding.calibration_tokens={self.calibration_tokens!r} must be "
                             f"an int >= 1")
        if self.projections is not None:
            bad = [p for p in self.projections if p not in self.thresholder().valid_projections]
            if isinstance(self.projections, str) or not self.projections or bad:
                raise ValueError(f"Thresholding.projections={self.projections!r}: must be a "
                                 f"non-empty tuple of {self.thresholder().valid_projections} for "
                                 f"method {self.method!r}")

    @property
    def active(self) -> bool:
        return self.method != "none"

    @property
    def tokens(self) -> int:
        return 16384 if self.calibration_tokens is None else self.calibration_tokens

    @property
    def seed(self) -> int:
        return 1 if self.calibration_seed is None else self.calibration_seed

    def thresholder(self) -> Thresholder:
        return THRESHOLDERS.get(self.method if self.active else "teal", "Thresholding.method")()

    def chosen_projections(self) -> tuple[str, ...]:
        return tuple(self.projections or self.thresholder().default_projections)


def check_target(target: object, setting: str) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ValueError(f"{setting}={target!r} must be a sparsity in [0, 1) (the fraction of "
                         f"entries set to zero)")
    return float(target)


def check_model(model_config: Any, method: str, projections: tuple[str, ...]) -> None:
    """ValueError unless every layer has every named projection, in the dense format (sites
    read dense kernels: WINA's row norms, the sparse decode path's rows and neuron-major
    weights), and the layers are not scanned (thresholds are set per layer, on the unscanned
    layout)."""
    if getattr(model_config, "scan_layers", False):
        raise ValueError(f"{method!r} sets activation thresholds per layer and needs "
                         f"ModelConfig.scan_layers=False; an unscanned run can start from a "
                         f"scanned run's params (--gin.warm_start.from_workdir=<workdir> "
                         f"--gin.warm_start.mode=\"'params'\" --gin.ModelConfig.scan_layers=False)")
    mlp = [p for p in projections if PROJECTIONS[p][0] == "mlp"]
    moe = [i for i in range(model_config.num_layers) if model_config.mlp_kind(i) != "dense"]
    if mlp and moe:
        raise ValueError(f"Thresholding.method={method!r} with projections {tuple(mlp)}: layers "
                         f"{moe} are MoE layers, which have no dense MLP projections (routed "
                         f"experts are not thresholded); name only attention projections "
                         f"{tuple(p for p in ALL if PROJECTIONS[p][0] == 'attn')} for this model")
    check_dense_projections(model_config, method, projections)


def check_dense_projections(model_config: Any, method: str, projections: tuple[str, ...]
                            ) -> None:
    """ValueError naming the first site whose projection a weight format other than dense
    stores (ModelConfig.weight_format / weight_format_overrides): a compact projection has
    no dense kernel for the site to read. CATS's gate site reads the gate, up and down
    kernels (its decode computes up and down for the active neurons only)."""
    spec = model_config.formats()
    for proj in projections:
        module, site_name = PROJECTIONS[proj][0], PROJECTIONS[proj][1]
        reads = (proj,)
        if method == "cats":
            site_name, reads = "gate_act", ("gate", "up", "down")
        for i in range(model_config.num_layers):
            for r in reads:
                path = f"layer_{i}/" + PROJECTIONS[r][2].removesuffix("/kernel")
                fmt = spec.format_at(path)
                if fmt != "dense":
                    raise ValueError(
                        f"{method!r}: the threshold site layer_{i}/{module}/{site_name} reads the "
                        f"dense kernel of {path}, which ModelConfig.weight_format="
                        f"{model_config.weight_format!r} (overrides: "
                        f"{model_config.weight_format_overrides!r}) stores as {fmt!r}; "
                        f"activation thresholds need dense projections: threshold only dense "
                        f"ones (Thresholding.projections) or keep these dense "
                        f"(ModelConfig.weight_format_overrides)")


def site_layout(params: Mapping[str, Any], model_config: Any, method: str,
                projections: tuple[str, ...]) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """{layer: {module: (site name, scale [features])}} for the chosen projections."""
    check_model(model_config, method, projections)
    th = THRESHOLDERS.get(method, "Thresholding.method")()
    out: dict[str, dict[str, Any]] = {}
    for i in range(model_config.num_layers):
        layer = params[f"layer_{i}"]
        for proj in projections:
            module = PROJECTIONS[proj][0]
            try:
                width = th.width(proj, layer)
            except (KeyError, TypeError):
                raise ValueError(f"Thresholding.projections: layer_{i} has no {proj!r} projection "
                                 f"({PROJECTIONS[proj][2]})") from None
            name = th.site_name(proj)
            out.setdefault(f"layer_{i}", {}).setdefault(module, {})[name] = \
                np.asarray(th.scale(proj, layer, width), np.float32)
    return out


def threshold_for(counts: np.ndarray, target: float) -> float:
    """The bin edge whose masked fraction (scores at or below it) is nearest `target`: one of
    the two edges of the bin holding the target quantile, so the calibrated sparsity is off by
    at most half that bin's mass. 0.0 for target 0 (only exact zeros)."""
    if target <= 0:
        return 0.0
    cdf = np.cumsum(counts) / max(float(np.sum(counts)), 1.0)
    j = min(int(np.searchsorted(cdf, target - 1e-12, side="left")), len(cdf) - 1)
    below = cdf[j - 1] if j > 0 else 0.0  # masked at edge_j: bins < j
    if j + 1 < len(BIN_EDGES) and cdf[j] - target <= target - below:
        return float(BIN_EDGES[j + 1])
    return float(BIN_EDGES[j])


def make_sites(layout: Mapping, target: float | Mapping[str, float],
               histograms: Mapping[str, np.ndarray] | None, capacity: Mapping[str, int] | None = None
               ) -> dict:
    """The 'act_sparsity' tree: a Site per layout entry, its threshold from its histogram at
    `target` (a float, or {site path: target}); without histograms, threshold -1 (keep all:
    the calibration pass). `capacity`: {site path: sparse-decode slots}."""
    tree: dict = {}
    for layer, modules in layout.items():
        for module, sites in modules.items():
            for name, scale in sites.items():
                path = f"{layer}/{module}/{name}"
                if histograms is None:
                    t = -1.0
                else:
                    tgt = target[path] if isinstance(target, Mapping) else target
                    t = threshold_for(histograms[path], tgt)
                cap = int((capacity or {}).get(path, 0))
                tree.setdefault(layer, {}).setdefault(module, {})[name] = Site(
                    jnp.asarray(t, jnp.float32), jnp.asarray(scale), cap)
    return tree


def site_paths(tree: Mapping) -> list[str]:
    return [f"{l}/{m}/{n}" for l, mods in tree.items() for m, sites in mods.items() for n in sites]
