"""Inference from a workdir: its latest checkpoint (or imported params), tokenizer and model,
loaded once (`load_workdir`) for `sparsejax sample` and the lm-evaluation-harness model."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax

from sparsejax.data.tokenizer import make_tokenizer
from sparsejax.infer.generate import generate
from sparsejax.infer.sparse_decode import decode_summary
from sparsejax.models.transformer import ModelConfig
from sparsejax.parallel.rules import LOGICAL_RULES
from sparsejax.sparsity.activation.evaluate import check_thresholding, thresholded_model
from sparsejax.train import trainer


@dataclasses.dataclass
class LoadedWorkdir:
    """What running a workdir's model needs. `model` is the run's model, wrapped with the
    calibrated activation thresholds when `Thresholding.method` is set (`sites` then holds
    them); `params` are the params it computes with (the sparsity method's forward params,
    on the run's mesh)."""

    run: Any
    step: int
    model: Any
    params: Any
    moe_state: Any
    sites: dict | None


def load_workdir(workdir: str) -> LoadedWorkdir:
    """Loads the workdir's model for inference (gin must already be parsed: the workdir's
    config and any bindings on top). Thresholding settings and the tokenizer are checked
    before anything is built or restored."""
    check_thresholding(ModelConfig())
    make_tokenizer()  # a missing or unusable tokenizer is a ValueError here
    cfg = trainer.TrainConfig()
    run, step, state = trainer.load_state_for_eval(workdir, cfg)
    params = state.params
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        if run.sparsity_method is not None:
            method = run.sparsity_method
            params = jax.jit(lambda s: method.forward_params(s.params, s.sparsity, step=s.step,
                                                             rng=None))(state)
        # Thresholding.method set: TEAL/CATS/WINA thresholds calibrated on training rows
        model, sites = thresholded_model(run, state, cfg)
    return LoadedWorkdir(run, step, model, params, state.moe_state, sites)


def sample_workdir(workdir: str, prompts: Sequence[str], *, max_new_tokens: int = 32,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = 0) -> dict[str, Any]:
    """Generates continuations of text `prompts` with the workdir's model (gin must already
    be parsed). Returns {'texts', 'tokens', 'tokens_per_s', 'step'}."""
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompt_file")
    check_thresholding(ModelConfig())  # before anything is built or restored
    tok = make_tokenizer()
    # as the tokenizer itself encodes a text (a Hugging Face tokenizer adds its own specials,
    # if any, as transformers does; the byte tokenizer starts with BOS as training rows do)
    ids = [list(tok.encode_text(p)) for p in prompts]
    loaded = load_workdir(workdir)
    with jax.set_mesh(loaded.run.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        out = generate(loaded.model, loaded.params, ids, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       pad_id=tok.pad_id, eos_id=tok.eos_id, moe_state=loaded.moe_state)
    # ids the model knows but the tokenizer does not (a padded vocab) have no text
    out["texts"] = [tok.decode([i for i in row if i < tok.vocab_size]) for row in out["tokens"]]
    out["step"] = loaded.step
    if loaded.sites is not None:
        out["sparse_decode"] = decode_summary(loaded.sites)
    return out
