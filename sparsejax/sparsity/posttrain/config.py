"""`PruneConfig`: what `sparsejax prune` does, as gin-configurable data (the command's flags
are shorthands for its bindings: `--method sparsegpt` is `PruneConfig.method = 'sparsegpt'`).
Solver settings live on their own classes (`SparseGPTSettings.dampening`, `DSnoT.max_cycles`,
`OWL.lam`, `GBLM.scale`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import gin

from sparsejax.config import check_field_types, check_step_spec
from sparsejax.sparsity.posttrain.allocation import ALLOCATIONS
from sparsejax.sparsity.posttrain.experts import EXPERT_REDUCERS
from sparsejax.sparsity.posttrain.solvers import PRUNERS

CALIBRATION_MODES = ("sequential", "parallel")
DEFAULT_SPARSITY = 0.5


def parse_nm(value: Any) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); None stays None; anything else is a ValueError."""
    if value is None:
        return None
    parts = str(value).split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        n = m = None
    if len(parts) != 2 or n is None or not 1 <= n < m:
        raise ValueError(f"PruneConfig.nm={value!r} must be 'N:M' with 1 <= N < M, e.g. '2:4' "
                         f"or '4:8'")
    return n, m


def check_calibration(config: Any, owner: str) -> None:
    """The calibration settings of `config` (calibration_samples, _seed, _split, _data,
    _batch_size: PruneConfig's, or another command's of the same names) for its class
    `owner`; a ValueError names the first bad one."""
    for name, lo in (("calibration_samples", 1), ("calibration_seed", 0)):
        if getattr(config, name) < lo:
            raise ValueError(f"{owner}.{name}={getattr(config, name)!r} must be >= {lo}")
    if config.calibration_split not in ("train", "validation"):
        raise ValueError(f"{owner}.calibration_split={config.calibration_split!r}; valid: "
                         f"['train', 'validation']")
    if config.calibration_data is not None and not str(config.calibration_data).startswith(
            "files:"):
        raise ValueError(f"{owner}.calibration_data={config.calibration_data!r}; valid: None "
                         f"(the run's dataset) or 'files:GLOB'")
    if config.calibration_batch_size is not None and config.calibration_batch_size < 1:
        raise ValueError(f"{owner}.calibration_batch_size={config.calibration_batch_size!r} "
                         f"must be >= 1 (or None)")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Post-training pruning of a trained or imported model (`sparsejax prune`).

    method: a registered pruner (`PRUNERS`: magnitude, wanda, gblm, sparsegpt) or None (only
      expert reduction). sparsity: pruned fraction of the prunable weights, in (0, 1)
      (default 0.5; N:M fixes it at 1 - N/M). structure: a registered structure (None: the
      method's default: per_output for Wanda/GBLM, unstructured for magnitude/SparseGPT).
      nm: 'N:M' along the input dim (sets structure 'nm'). allocation: `ALLOCATIONS`
      (uniform, owl). dsnot: refine every mask with DSnoT.
    calibration_samples / calibration_seed / calibration_split: the calibration sequences
      (TrainConfig.seq_len tokens each) drawn from the run's dataset with its tokenizer.
      calibration_data: 'files:GLOB' draws them as the SparseGPT / Wanda papers do instead:
      random windows (seed calibration_seed) of the files' text joined with a blank line and
      tokenized once (train/text_eval.py); None (default): the run's dataset.
      calibration: 'sequential' (block l calibrates on the outputs of the pruned blocks before
      it) or 'parallel' (every block on the dense model's activations).
      calibration_batch_size: sequences per forward (None: TrainConfig.global_batch_size).
    include / exclude: regexes on param paths (after the defaults: embeddings, norms, biases
      and routers are never pruned). prune_head: prune the (untied) LM head too, calibrated
      on the final hidden states (the papers leave it dense).
    experts / num_experts: an `EXPERT_REDUCERS` entry (frequency, reconstruction, merge, reap)
      and the experts every MoE layer keeps (at least MoeMlp.top_k, HF's num_experts_per_tok).
      protect_super_experts: keep each layer's super experts (super_experts.py; settings
      `SuperExperts.multiple`) whatever the reducer says (default True). drop_experts: experts
      every reduction drops, as 'LAYER:EXPERT' strings ('3:5': expert 5 of layer 3); shared
      experts are never dropped ('3:shared' is refused).
    finetune_steps: TrainConfig.num_steps of the sparse recovery fine-tune written to the
      output workdir (int: steps; float in [0, 1]: a fraction of the source run's num_steps).
    compact: write the output in the compact block-sparse weight format
      (ModelConfig.weight_format='block_sparse', BlockSparse block sizes = BlockStructure.block,
      density = the kept fraction): needs structure 'block', whose blocks it then selects with
      a constant fan-in (BlockStructure.per_column), uniform allocation, and every attention
      and MLP projection pruned (no include / exclude / prune_head, no MoE experts); the
      fine-tune keeps the layout fixed (make_method.name='dense').
    eval_tokens: size of the eval sample scored before and after (None: TrainConfig's).
    """

    method: str | None = "sparsegpt"
    sparsity: float | None = None
    structure: str | None = None
    nm: str | None = None
    allocation: str = "uniform"
    dsnot: bool = False
    calibration_samples: int = 128
    calibration_seed: int = 0
    calibration_split: str = "train"
    calibration_data: str | None = None
    calibration: str = "sequential"
    calibration_batch_size: int | None = None
    include: tuple = ()
    exclude: tuple = ()
    prune_head: bool = False
    experts: str | None = None
    num_experts: int | None = None
    protect_super_experts: bool = True
    drop_experts: tuple = ()
    finetune_steps: int | float = 0.1
    eval_tokens: int | None = None
    compact: bool = False

    def __post_init__(self):
        check_field_types(self)
        P = "PruneConfig"
        if self.method is None and self.experts is None:
            raise ValueError(f"{P}.method=None prunes no weights; give a method "
                             f"({PRUNERS.names()}) or PruneConfig.experts")
        if self.method is not None:
            PRUNERS.get(self.method, f"{P}.method")
        nm = parse_nm(self.nm)
        if self.sparsity is not None:
            s = float(self.sparsity)
            if math.isnan(s) or not 0.0 < s < 1.0:
                raise ValueError(f"{P}.sparsity={self.sparsity!r} must be in (0, 1): the "
                                 f"fraction of the prunable weights set to zero")
            if self.method is None:
                raise ValueError(f"{P}.sparsity={self.sparsity!r} has no effect with "
                                 f"{P}.method=None")
            if nm is not None and abs(s - (1 - nm[0] / nm[1])) > 1e-9:
                raise ValueError(f"{P}.sparsity={self.sparsity!r} conflicts with {P}.nm="
                                 f"{self.nm!r}, which prunes {1 - nm[0] / nm[1]:g}")
        if nm is not None and self.structure not in (None, "nm"):
            raise ValueError(f"{P}.nm={self.nm!r} sets structure 'nm'; {P}.structure="
                             f"{self.structure!r} conflicts")
        if self.method is not None:
            pruner = PRUNERS.get(self.method)
            if self.structure_name not in pruner.structures:
                raise ValueError(f"{P}.structure={self.structure_name!r} is not available for "
                                 f"{P}.method={self.method!r}; valid: {list(pruner.structures)}")
        alloc = ALLOCATIONS.get(self.allocation, f"{P}.allocation")
        if alloc is not ALLOCATIONS.get("uniform") and (nm is not None or
                                                       self.structure_name == "global"):
            raise ValueError(f"{P}.allocation={self.allocation!r} needs per-layer densities; "
                             f"structure {self.structure_name!r} fixes them")
        if self.dsnot and (self.method is None or self.structure_name == "block"):
            raise ValueError(f"{P}.dsnot=True refines a weight mask row by row; it needs a "
                             f"method and a structure other than 'block'")
        check_calibration(self, P)
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(f"{P}.calibration={self.calibration!r}; valid: "
                             f"{list(CALIBRATION_MODES)}")
        if (self.experts is None) != (self.num_experts is None):
            raise ValueError(f"{P}.experts={self.experts!r} and {P}.num_experts="
                             f"{self.num_experts!r} go together (a reduction and the experts "
                             f"each MoE layer keeps)")
        if self.experts is not None:
            EXPERT_REDUCERS.get(self.experts, f"{P}.experts")
            if self.num_experts < 1:
                raise ValueError(f"{P}.num_experts={self.num_experts!r} must be >= 1")
        self.dropped_experts()
        if self.experts is None and (self.drop_experts or not self.protect_super_experts):
            given = "drop_experts" if self.drop_experts else "protect_super_experts"
            raise ValueError(f"{P}.{given}={getattr(self, given)!r} has no effect without "
                             f"{P}.experts (an expert reduction)")
        check_step_spec(self.finetune_steps, f"{P}.finetune_steps", minimum=1)
        if self.compact:
            self._check_compact()
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise ValueError(f"{P}.eval_tokens={self.eval_tokens!r} must be >= 1 (or None)")

    def _check_compact(self) -> None:
        """`compact` needs the structure the compact format stores, over every projection."""
        P = "PruneConfig"
        if self.method is None or self.structure_name != "block":
            raise ValueError(f"{P}.compact=True (--compact) stores whole blocks and needs "
                             f"{P}.structure='block' (--structure=block) with a method; got "
                             f"structure {self.structure_name if self.method else None!r}")
        if self.allocation != "uniform":
            raise ValueError(f"{P}.compact=True (--compact): the compact format has one density "
                             f"for every projection; {P}.allocation={self.allocation!r} gives "
                             f"per-layer densities (use 'uniform')")
        changed = [f"{P}.{n}={getattr(self, n)!r}" for n in ("include", "exclude")
                   if tuple(getattr(self, n))] + ([f"{P}.prune_head=True"] if self.prune_head
                                                  else [])
        if changed:
            raise ValueError(f"{P}.compact=True (--compact) stores every attention and MLP "
                             f"projection compactly, so all of them and only them are pruned; "
                             f"{', '.join(changed)} changes that")

    def dropped_experts(self) -> dict[int, list[int]]:
        """PruneConfig.drop_experts as {layer: [experts]} (checked against the model in
        plan.check_experts)."""
        P = "PruneConfig.drop_experts"
        if isinstance(self.drop_experts, str):
            raise ValueError(f"{P}={self.drop_experts!r} must be a tuple of 'LAYER:EXPERT' "
                             f"strings, e.g. ('3:5',)")
        out: dict[int, list[int]] = {}
        for item in self.drop_experts:
            layer, _, expert = str(item).partition(":")
            if expert.strip().lower() == "shared":
                raise ValueError(f"{P} names {item!r}, a shared expert: shared experts "
                                 f"(MoeMlp.num_shared_experts) process every token and are "
                                 f"never dropped; name routed experts ('LAYER:EXPERT')")
            try:
                layer_i, expert_i = int(layer), int(expert)
            except ValueError:
                layer_i = expert_i = -1
            if layer_i < 0 or expert_i < 0:
                raise ValueError(f"{P} holds {item!r}; valid: 'LAYER:EXPERT' with integer "
                                 f"indices >= 0, e.g. '3:5'")
            out.setdefault(layer_i, []).append(expert_i)
        return {k: sorted(set(v)) for k, v in out.items()}

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        return parse_nm(self.nm)

    @property
    def structure_name(self) -> str:
        if self.nm is not None:
            return "nm"
        if self.structure is not None:
            return self.structure
        return PRUNERS.get(self.method).default_structure if self.method else "unstructured"

    @property
    def density(self) -> float:
        """Kept fraction of the prunable weights."""
        nm = self.nm_pair
        if nm is not None:
            return nm[0] / nm[1]
        return 1.0 - (DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity))

    def settings(self) -> dict[str, Any]:
        """The config as JSON-able data (for prune_report.json)."""
        out = dataclasses.asdict(self)
        out.update(structure=self.structure_name, density=self.density,
                   include=list(self.include), exclude=list(self.exclude),
                   drop_experts=list(self.drop_experts))
        return out
