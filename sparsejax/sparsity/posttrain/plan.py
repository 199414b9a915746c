"""What `prune_model` will do, checked before any work: which kernels are pruned (and in which
block), with which pruner and structure, at which density, and everything that can be
wrong with that (a ValueError naming the setting, the value and what is valid)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.models.moe.layer import MoeMlp
from sparsejax.models.moe.router import ROUTERS
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.mesh import data_parallel_size
from sparsejax.sparsity import masks as masks_lib
from sparsejax.sparsity import paths as paths_lib
from sparsejax.sparsity import select
from sparsejax.sparsity import structures as struct_lib
from sparsejax.sparsity.criteria import CRITERIA
from sparsejax.sparsity.posttrain import capture, gradients
from sparsejax.sparsity.posttrain import stats as stats_lib
from sparsejax.sparsity.posttrain.allocation import ALLOCATIONS
from sparsejax.sparsity.posttrain.config import PruneConfig
from sparsejax.sparsity.posttrain.dsnot import DSnoT
from sparsejax.sparsity.posttrain.experts import EXPERT_REDUCERS, ExpertReducer
from sparsejax.sparsity.posttrain.solvers import PRUNERS, Pruner, SparseGPTPruner, make_structure
from sparsejax.sparsity.posttrain.super_experts import SuperExperts

PyTree = Any
HEAD = "lm_head/kernel"


def get_path(tree: PyTree, path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def set_path(tree: PyTree, path: str, value: Any) -> PyTree:
    """A copy of nested dict `tree` with `path` set to `value` (dicts along it copied)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = set_path(tree[head], rest, value) if rest else value
    return out


@dataclasses.dataclass
class Plan:
    cfg: ModelConfig
    config: PruneConfig
    pruner: Pruner | None
    structure: struct_lib.Structure | None
    reducer: ExpertReducer | None
    paths: list[str]                      # pruned kernels, in param order
    valid_masks: dict[str, jax.Array]     # padded kernels: their real entries
    sizes: dict[str, int]                 # real entries per pruned kernel
    n: int                                # calibration sequences
    batch_size: int
    mesh: jax.sharding.Mesh
    loss_fn: Callable | None = None
    densities: dict[str, float] = dataclasses.field(default_factory=dict)
    block_density: dict[int, float] = dataclasses.field(default_factory=dict)
    grads: dict[str, jax.Array] | None = None
    global_masks: dict[str, jax.Array] | None = None
    programs: dict = dataclasses.field(default_factory=dict)  # compiled block programs
    include: tuple = ()  # the regexes that chose `paths` (paths_lib.prunable_tree)
    exclude: tuple = ()

    @property
    def expert_outputs(self) -> bool:
        """Whether calibration measures the experts' outputs (REAP, super experts)."""
        return self.reducer is not None and (self.reducer.needs_expert_outputs
                                             or self.config.protect_super_experts)

    @property
    def blocks(self) -> list[int]:
        return list(range(self.cfg.num_layers))

    def block_paths(self, layer: int) -> list[str]:
        prefix = capture.layer_name(layer) + "/"
        return [p for p in self.paths if p.startswith(prefix)]

    def block_keep(self, layer: int) -> set[str]:
        prefix = capture.layer_name(layer) + "/"
        return {p[len(prefix):] for p in self.block_paths(layer)}

    def head_paths(self) -> list[str]:
        return [p for p in self.paths if p == HEAD]

    def kernel(self, params: PyTree, path: str) -> jax.Array:
        return get_path(params, path)

    def set_kernel(self, params: PyTree, path: str, value: jax.Array) -> PyTree:
        return set_path(params, path, value)

    def valid_of(self, path: str) -> jax.Array | None:
        return self.valid_masks.get(path)

    def real_size(self, path: str) -> int:
        return self.sizes[path]

    @property
    def structure_is_global(self) -> bool:
        return isinstance(self.structure, struct_lib.Global)

    def solve_layout(self, kernel: jax.Array) -> jax.Array:
        """SparseGPT's rows (output units) split over every device when they divide evenly."""
        n = self.mesh.size
        if isinstance(self.pruner, SparseGPTPruner) and n > 1 and kernel.shape[-1] % n == 0:
            spec = P(*([None] * (kernel.ndim - 1)), tuple(self.mesh.axis_names))
            return jax.device_put(kernel, NamedSharding(self.mesh, spec))
        return kernel

    def allocate(self, outlier_ratios: dict[int, float] | None) -> None:
        """Per-kernel target densities from the allocation (blocks) and the target."""
        density = self.config.density
        sizes = {b: sum(self.sizes[p] for p in self.block_paths(b)) for b in self.blocks}
        sizes = {b: s for b, s in sizes.items() if s}
        alloc = ALLOCATIONS.get(self.config.allocation)()
        ratios = None if outlier_ratios is None else {b: outlier_ratios[b] for b in sizes}
        self.block_density = alloc.densities(sizes, density, ratios) if sizes else {}
        for p in self.paths:
            layer = int(p.split("/")[0][len("layer_"):]) if p != HEAD else None
            self.densities[p] = self.block_density.get(layer, density)

    def set_grads(self, loss_fn, params, rows) -> None:
        template = self.masks_tree(params, {p: jnp.ones(get_path(params, p).shape, bool)
                                            for p in self.paths})
        tree = gradients.grad_sq_sums(loss_fn, params, rows, template)
        self.grads = {p: get_path(tree, p) for p in self.paths}

    def set_global_masks(self, params) -> None:
        """One magnitude ranking over every pruned kernel ('global')."""
        template = self.masks_tree(params, {p: jnp.ones(get_path(params, p).shape, bool)
                                            for p in self.paths})
        scores = masks_lib.map_on_masks(lambda w, m: jnp.abs(w), template, params)
        valid = paths_lib.map_with_path(
            lambda p, m: self.valid_masks.get(p, jnp.ones(m.shape, bool)), template)
        total = int(round(self.config.density * sum(self.sizes.values())))
        keep = select.global_topk(scores, template, total, alive_only=False, valid=valid)
        self.global_masks = {p: get_path(keep, p) for p in self.paths}

    def masks_tree(self, params: PyTree, masks: dict[str, jax.Array]) -> PyTree:
        """A tree mirroring `params` with `masks[path]` where given, None elsewhere."""
        return paths_lib.map_with_path(lambda p, x: masks.get(p), params)

    def solver_settings(self) -> dict[str, Any]:
        out = {}
        if isinstance(self.pruner, SparseGPTPruner):
            out["sparsegpt"] = vars(self.pruner.settings)
        if self.config.dsnot:
            out["dsnot"] = vars(DSnoT())
        if self.reducer is not None and self.config.protect_super_experts:
            out["super_experts"] = vars(SuperExperts())
        if ALLOCATIONS.get(self.config.allocation).needs_outliers:
            out["owl"] = vars(ALLOCATIONS.get(self.config.allocation)())
        if self.pruner is not None and getattr(self.pruner, "criterion", None) == "gblm":
            out["gblm"] = vars(CRITERIA.get("gblm")())
        return out


def _moe_settings(cfg: ModelConfig):
    moe_layers = [i for i in range(cfg.num_layers) if cfg.mlp_kind(i) == "moe"]
    return moe_layers, (MoeMlp(embed_dim=cfg.embed_dim) if moe_layers else None)


def check_experts(cfg: ModelConfig, pc: PruneConfig) -> None:
    """PruneConfig.num_experts against the model's MoE layers and router."""
    layers, mod = _moe_settings(cfg)
    k = pc.num_experts
    if not layers:
        raise ValueError(f"PruneConfig.experts={pc.experts!r}: the model has no MoE layer "
                         f"(ModelConfig.mlp_kinds={tuple(cfg.mlp_kinds)})")
    if k < mod.top_k:
        raise ValueError(f"PruneConfig.num_experts={k} is below MoeMlp.top_k={mod.top_k} "
                         f"(num_experts_per_tok): every token is routed to top_k experts, so a "
                         f"layer keeps at least {mod.top_k}")
    if k >= mod.num_experts:
        raise ValueError(f"PruneConfig.num_experts={k} must be below MoeMlp.num_experts="
                         f"{mod.num_experts}: the experts each MoE layer keeps")
    for layer, experts in pc.dropped_experts().items():
        if layer not in layers:
            raise ValueError(f"PruneConfig.drop_experts names layer {layer}, which is not an "
                             f"MoE layer; MoE layers: {layers}")
        bad = [e for e in experts if e >= mod.num_experts]
        if bad:
            raise ValueError(f"PruneConfig.drop_experts names expert {bad[0]} of layer {layer}; "
                             f"valid: 0..{mod.num_experts - 1} (MoeMlp.num_experts)")
        if mod.num_experts - len(experts) < k:
            raise ValueError(f"PruneConfig.drop_experts drops {len(experts)} experts of layer "
                             f"{layer}, leaving fewer than PruneConfig.num_experts={k}")
    router = ROUTERS.get(mod.router, "MoeMlp.router")()
    groups = getattr(router, "num_groups", 1)
    if k % groups:
        raise ValueError(f"PruneConfig.num_experts={k} must be a multiple of "
                         f"{type(router).__name__}.num_groups={groups}")


def _traced_groups(cfg: ModelConfig, params: PyTree, moe_state: PyTree | None,
                   keep: dict[int, set[str]]) -> dict[int, set[str]]:
    """{layer: kernels whose inputs calibration records} by tracing each block abstractly."""
    out = {}
    x = jax.ShapeDtypeStruct((1, 8, cfg.embed_dim), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    for layer, paths in keep.items():
        if not paths:
            continue
        name = capture.layer_name(layer)
        found: set[str] = set()

        def trace(bp, ms, x, pos, seg):
            _, rec = capture.capture_block(cfg, layer, bp, x, pos, seg, ms)
            found.update(stats_lib.group_inputs(rec.inputs, paths)[1])
            for mpath in rec.moe:
                found.update(p for p in paths if p.startswith(mpath + "/experts/")
                             or p.startswith(mpath + "/shared_experts/"))
            return 0

        jax.eval_shape(trace, params[name], (moe_state or {}).get(name), x, ids, ids)
        out[layer] = found
    return out


def prunable_regexes(params: PyTree, pc: PruneConfig) -> tuple[tuple, tuple]:
    """(include, exclude) for paths_lib.prunable_tree: the config's, plus the LM head
    excluded unless PruneConfig.prune_head (and the model has an untied head)."""
    exclude = tuple(pc.exclude)
    if pc.prune_head and "lm_head" not in params:
        raise ValueError("PruneConfig.prune_head=True: the model has no LM head of its own "
                         "(ModelConfig.tie_embeddings=True: the head is the embedding)")
    if not pc.prune_head and "lm_head" in params:
        exclude += ("^lm_head/",)
    return tuple(pc.include), exclude


def build_plan(cfg: ModelConfig, params: PyTree, moe_state: PyTree | None, pc: PruneConfig, *,
               valid: dict | None, loss_fn: Callable | None, num_samples: int,
               batch_size: int | None, mesh: jax.sharding.Mesh) -> Plan:
    """Checks the pruning against the model and returns its Plan (no work done)."""
    capture.check_layout(cfg, params)
    pruner = None if pc.method is None else PRUNERS.get(pc.method)()
    structure = None if pc.method is None else make_structure(pc.structure_name, pc.nm_pair,
                                                              pc.compact)
    if pruner is not None and pruner.needs_grads and loss_fn is None:
        raise ValueError(f"PruneConfig.method={pc.method!r} scores weights with gradients of "
                         f"the training loss, and this model has none (loss_fn=None); use a "
                         f"method without gradients ({[n for n in PRUNERS.names() if not PRUNERS.get(n).needs_grads]})")
    reducer = None
    if pc.experts is not None:
        check_experts(cfg, pc)
        reducer = EXPERT_REDUCERS.get(pc.experts)()
        if pc.protect_super_experts:
            SuperExperts()  # its settings are checked (and used) now
    if pc.dsnot:
        DSnoT()  # its settings are checked (and used) now
    if ALLOCATIONS.get(pc.allocation).needs_outliers:
        ALLOCATIONS.get(pc.allocation)()
    dp = data_parallel_size(mesh)
    batch = pc.calibration_batch_size or batch_size or dp
    if batch % dp:
        raise ValueError(f"PruneConfig.calibration_batch_size={batch} must be a multiple of "
                         f"the data-parallel size {dp} (mesh {dict(mesh.shape)})")
    paths, valid_masks, sizes = [], {}, {}
    include, exclude = prunable_regexes(params, pc)
    if pruner is not None:
        prunable = paths_lib.prunable_tree(params, include, exclude)
        masks = masks_lib.ones_masks(params, prunable, valid)
        vtree = masks_lib.valid_tree(masks, valid)
        vnamed = {} if vtree is None else dict(paths_lib.named_leaves(vtree))
        sizes = masks_lib.real_sizes(masks, valid)
        for path, m in paths_lib.named_leaves(masks):
            if path == HEAD and not pc.prune_head:
                continue
            inside = path.split("/")[0] in {capture.layer_name(i) for i in range(cfg.num_layers)}
            if not inside and path != HEAD:
                raise ValueError(f"PruneConfig.include={pc.include!r} selects params[{path!r}]; "
                                 f"post-training pruning prunes the linear layers of the "
                                 f"blocks and the LM head ('{HEAD}')")
            shape2d = tuple(m.shape[-2:])
            if pc.compact and m.ndim != 2:
                raise ValueError(f"PruneConfig.compact=True (--compact): params[{path!r}] "
                                 f"{m.shape} is not a projection the compact format stores "
                                 f"(MoE experts stay in their own stacked kernels); prune this "
                                 f"model without --compact")
            if m.ndim not in (2, 3):
                raise ValueError(f"params[{path!r}] has shape {m.shape}; post-training pruning "
                                 f"prunes 2-D kernels [in, out] and stacked experts [E, in, out]")
            structure.check(path, shape2d)
            if isinstance(pruner, SparseGPTPruner):
                pruner.check(path, shape2d, structure)
            if valid and path in valid:
                valid_masks[path] = vnamed[path]
            paths.append(path)
        keep = {i: {p[len(capture.layer_name(i)) + 1:] for p in paths
                    if p.startswith(capture.layer_name(i) + "/")} for i in range(cfg.num_layers)}
        traced = _traced_groups(cfg, params, moe_state, keep)
        for layer, ks in keep.items():
            missing = sorted(ks - traced.get(layer, set()))
            if missing:
                raise ValueError(f"params[{capture.layer_name(layer)}/{missing[0]}] is prunable "
                                 f"but calibration cannot read its input (a kernel used "
                                 f"outside nn.Dense, Attention projections and MoE experts); "
                                 f"exclude it with PruneConfig.exclude")
    plan = Plan(cfg, pc, pruner, structure, reducer, paths, valid_masks, sizes, num_samples,
                batch, mesh, loss_fn, include=include, exclude=exclude)
    plan.solver_settings()  # builds every gin-configured part now (settings checked, used)
    return plan
