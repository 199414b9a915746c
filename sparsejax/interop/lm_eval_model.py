"""The lm-evaluation-harness model `sparsejax` (lm_eval 0.4.13): any workdir (trained,
imported, pruned, sparse, compact, MoE) scored and decoded with its own tokenizer, operative
config and mesh, optionally under activation-sparsity thresholds given as gin bindings.

    sparsejax lm-eval --model_args workdir=runs/llama,batch_size=8 --tasks hellaswag,wikitext

`sparsejax lm-eval` is lm_eval's own command line (every flag of `lm_eval`) with this model
registered and `--model sparsejax` the default; `--gin.A.b=V` flags join the `gin` model_arg.
lm_eval 0.4.13 looks models up only in its registry, which importing their module fills (it
reads no entry points), so the plain `lm_eval` command does not know `sparsejax`. From
Python, pass an instance: `lm_eval.simple_evaluate(model=SparsejaxLM(workdir=W), ...)`, or
import this module and use `model="sparsejax"`.

model_args: `workdir` (required), `batch_size` (rows per forward pass, rounded up to a
multiple of the mesh's data-parallel size; lm_eval's --batch_size when not given here),
`max_length` (the context, default ModelConfig.max_seq_len), `max_gen_toks` (default 256, as
lm_eval's hf model; a task's generation kwargs override it), `gin` (bindings on top of the
workdir's config, separated by ';', e.g. `gin="Thresholding.method='teal';
Thresholding.target=0.5"`) and `gin_file` (gin files, ';'-separated). lm_eval's `device` and
`max_batch_size` do not apply (the model runs on the run's mesh: `make_mesh.*` bindings) and
are dropped.

Requests are answered as lm_eval's `hf` model answers them for the same model exported with
`sparsejax export-hf` (tests/interop/test_lm_eval_model.py): text is tokenized as its
tokenizer.json does by itself, with the special tokens it adds (not config.json's
bos_token_id; the byte tokenizer puts its BOS first, as training documents start), an empty
context is the BOS token (else EOS), contexts and continuations are split and left-truncated
as there, `loglikelihood_rolling` scores disjoint windows of `max_length` tokens
(lm_eval.utils.get_rolling_token_windows), and `generate_until` decodes greedily with the KV
cache, cut at the first stop sequence or EOS. Sampling (`do_sample`, a temperature above 0),
other generation kwargs and chat templates are refused. As in training, an MoE layer with a
capacity (token dropping, expert choice) routes each token among the other tokens of its
batch, padding included, so its results depend on the batch.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import datasets
import gin
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval._cli.harness import HarnessCLI
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tokenizers import Tokenizer
from tqdm import tqdm

from sparsejax.config import check_unused_bindings
from sparsejax.data.tokenizer import ByteTokenizer, make_tokenizer
from sparsejax.infer.batched import BatchedModel
from sparsejax.infer.workdir import load_workdir
from sparsejax.models.transformer import ModelConfig
from sparsejax.train.commands import parse_workdir_config

MODEL_ARGS = ("workdir", "batch_size", "max_length", "max_gen_toks", "gin", "gin_file")
# lm_eval passes these to every model; they have no meaning here
DROPPED_ARGS = ("device", "max_batch_size")
GREEDY_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature")


def _int_arg(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model_args {name}={value!r} must be an int >= 1")
    return value


def _list_arg(name: str, value: Any) -> list[str]:
    """`a;b` or a list of strings -> ['a', 'b']."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.replace("\n", ";").split(";") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"model_args {name}={value!r} must be a string (';'-separated) or a list "
                     f"of strings")


class _Text:
    """The workdir tokenizer as lm_eval's hf model uses a tokenizer: `encode` adds the special
    tokens the tokenizer adds by itself (a tokenizer.json's post-processor; the byte tokenizer
    its BOS, as its training documents start)."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.hf = None if isinstance(tok, ByteTokenizer) else Tokenizer.from_file(tok.path)
        self.name = "byte" if self.hf is None else tok.path

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.hf is None:
            return [int(i) for i in self.tok.encode(text, add_bos=add_special_tokens)]
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.tok.vocab_size]
        if self.hf is None:  # special ids have no text
            return self.tok.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)


@register_model("sparsejax")
class SparsejaxLM(TemplateLM):
    """lm_eval model over a sparsejax workdir (module docstring: model_args, behaviour)."""

    backend = "causal"

    def __init__(self, workdir: str | None = None, batch_size: int | str = 1,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 gin: str | Sequence[str] | None = None,
                 gin_file: str | Sequence[str] | None = None, **unsupported: Any):
        super().__init__()
        if unsupported:
            raise ValueError(f"model_args {sorted(unsupported)} are not supported by the "
                             f"sparsejax model; supported: {', '.join(MODEL_ARGS)}")
        if not workdir or not isinstance(workdir, str):
            raise ValueError(f"model_args workdir={workdir!r}: give the sparsejax workdir to "
                             f"evaluate (workdir=PATH)")
        self.workdir = workdir
        self._batch_size = _int_arg("batch_size", batch_size)
        self._max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self._bindings = _list_arg("gin", gin)
        self._gin_files = _list_arg("gin_file", gin_file)
        self._config_text = ""
        self._activate()
        limit = int(ModelConfig().max_seq_len)
        self._max_length = limit if max_length is None else _int_arg("max_length", max_length)
        if self._max_length > limit:
            raise ValueError(f"model_args max_length={max_length} exceeds the model's "
                             f"ModelConfig.max_seq_len={limit}")
        try:
            tok = make_tokenizer()
        except ValueError as e:
            raise ValueError(f"workdir={workdir!r} has no usable tokenizer: {e}") from None
        loaded = load_workdir(workdir)
        check_unused_bindings()  # a binding given in `gin` that nothing read is refused
        self.step, self.sites = loaded.step, loaded.sites
        self.text = _Text(tok)
        self.pad_id = int(tok.pad_id)
        self._eos = tok.eos_id
        self._prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        self._prefix_text = ("" if self._prefix is None or self.text.hf is None
                             else self.text.decode([self._prefix], skip_special_tokens=False))
        self._eos_text = (None if self._eos is None or self.text.hf is None
                          else self.text.decode([self._eos], skip_special_tokens=False))
        self.batched = BatchedModel(loaded.model, loaded.params, loaded.moe_state,
                                    loaded.run.mesh, self._batch_size)

    # --- construction from lm_eval's model_args ----------------------------------------

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> "SparsejaxLM":
        """model_args win over lm_eval's own settings (--batch_size), which have defaults
        whether given or not; `device` and `max_batch_size` are dropped."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in DROPPED_ARGS}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> "SparsejaxLM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    def _activate(self) -> None:
        """Parses this model's gin config (the workdir's, then `gin_file` and `gin`) unless it
        is the one in force: gin is process-wide, and the model's layers read it when a new
        batch shape is traced."""
        if self._config_text and gin.config_str() == self._config_text:
            return
        self._config_text = parse_workdir_config(self.workdir, self._gin_files, self._bindings)

    # --- what lm_eval asks of a model ---------------------------------------------------

    @property
    def eot_token_id(self) -> int | None:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is None:
            raise ValueError(f"workdir={self.workdir!r}: its tokenizer defines no BOS or EOS id "
                             f"(make_tokenizer.bos_id / eos_id) to condition an empty context "
                             f"or the first rolling window on")
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.text.name

    def get_model_info(self) -> dict[str, Any]:
        info = {"sparsejax_workdir": self.workdir, "sparsejax_step": self.step}
        if self._bindings:
            info["sparsejax_gin"] = list(self._bindings)
        return info

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template:
            raise ValueError("the sparsejax model has no chat template: --apply_chat_template "
                             "is not supported")
        return None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        raise ValueError("the sparsejax model has no chat template: --apply_chat_template is "
                         "not supported")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:  # a string that starts with the BOS text gets no other
            add_special_tokens = not (self._prefix_text and string.startswith(self._prefix_text))
        ids = self.text.encode(string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.text.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """[(request key or None, context ids, continuation ids)] -> [(sum of the
        continuation's log-probs, whether it is the greedy continuation)]; the sequence is
        left-truncated to max_length + 1 tokens."""
        self._activate()
        seqs = []
        for _, ctx, cont in requests:
            if not ctx or not cont or len(cont) > self.max_length:
                raise ValueError(f"a loglikelihood request has {len(ctx)} context and "
                                 f"{len(cont)} continuation tokens; it needs at least one of "
                                 f"each and at most max_length={self.max_length} of the latter")
            seqs.append((list(ctx) + list(cont))[-(self.max_length + 1):])
        with tqdm(total=len(seqs), disable=disable_tqdm,
                  desc="Running loglikelihood requests") as bar:
            scored = self.batched.logprobs(seqs, progress=bar.update)
        res = []
        for (key, _, cont), (logp, greedy) in zip(requests, scored):
            n = len(cont)
            answer = (float(np.sum(logp[-n:], dtype=np.float64)), bool(greedy[-n:].all()))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            res.append(answer)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window,
                                 lm_utils.get_rolling_token_windows(
                                     token_list=self.tok_encode(string),
                                     prefix_token=self.prefix_token_id,
                                     max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _greedy_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        """(stop sequences, EOS's text included; new tokens) of a request's generation
        kwargs, or a ValueError for anything but greedy decoding."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until: generation kwargs {gen_kwargs!r} must be a dict")
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0) or 0.0) > 0:
            raise ValueError(f"generate_until: the sparsejax model decodes greedily; the "
                             f"request asks to sample ({gen_kwargs})")
        until = handle_stop_sequences(kw.pop("until", None), eos=self._eos_text)
        n = int(kw.pop("max_gen_toks"))
        if kw:
            raise ValueError(f"generate_until: generation kwargs {sorted(kw)} are not "
                             f"supported by the sparsejax model; supported: "
                             f"{', '.join(GREEDY_KWARGS)} (or max_new_tokens)")
        if not 1 <= n < self.max_length:
            raise ValueError(f"generate_until: max_gen_toks={n} must be in [1, max_length="
                             f"{self.max_length})")
        return until, n

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._activate()
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        res: list[Any] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm,
                   desc="Running generate_until requests")
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            until, n = self._greedy_settings(gen_kwargs)
            prompts = [self.tok_encode(requests[i].args[0],
                                       left_truncate_len=self.max_length - n) or
                       [self.prefix_token_id] for i in idx]
            rows = self.batched.greedy(prompts, n, pad_id=self.pad_id, eos_id=self._eos,
                                       progress=bar.update)
            for i, row in zip(idx, rows):
                text = postprocess_generated_text(self.tok_decode(row), until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                res[i] = text
        bar.close()
        return res


def main(argv: Sequence[str] | None = None, bindings: Sequence[str] = ()) -> int:
    """lm_eval's command line with this model registered (`sparsejax lm-eval`): `--model`
    defaults to sparsejax, and `--gin.A.b=V` flags join its `gin` model_arg."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        if argv[:1] == ["run"]:
            argv = ["run", "--model", "sparsejax", *argv[1:]]
        elif argv[:1] not in (["ls"], ["validate"]):
            argv = ["--model", "sparsejax", *argv]
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # HarnessCLI reads sys.argv
    try:
        lm_utils.setup_logging()
        cli = HarnessCLI()
        args = cli.parse_args()
        if bindings:
            if getattr(args, "model", None) != "sparsejax":
                raise ValueError(f"--gin.* bindings apply to --model sparsejax, not "
                                 f"{getattr(args, 'model', None)!r}")
            model_args = dict(getattr(args, "model_args", None) or {})
            model_args["gin"] = _list_arg("gin", model_args.get("gin")) + list(bindings)
            args.model_args = model_args
        cli.execute(args)
    finally:
        sys.argv = saved
    return 0


def jsonl_dataset(path: str) -> datasets.DatasetDict:
    """A local task's data: the rows of the jsonl file at `path` as the 'test' split (for a
    task YAML's `custom_dataset: !function`, so that nothing is downloaded)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
