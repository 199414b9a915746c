"""`sparsejax sample`, `longeval`, `streaming-heads` and `prefill-search` (wired into
sparsejax/cli.py)."""
from __future__ import annotations

import argparse
from typing import Sequence

from sparsejax import cli
from sparsejax.train.commands import guarded, parse_workdir_config, shorthand_bindings


def add_parsers(sub) -> None:
    s = sub.add_parser("sample", help="generate text from a workdir's model (KV cache)")
    s.add_argument("--workdir", required=True)
    s.add_argument("--prompt", action="append", default=[], help="repeatable: a batch")
    s.add_argument("--prompt_file", help="one prompt per line")
    s.add_argument("--max_new_tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top_k", type=int, default=0)
    s.add_argument("--top_p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--gin_file", action="append", default=[],
                   help="gin files of the run (an import-hf or trained workdir needs none)")
    s.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    s.set_defaults(handler=run_sample)

    e = sub.add_parser("longeval", help="RULER-style retrieval accuracy (passkey, needles, "
                                        "variable tracking) per task and context length")
    e.add_argument("--workdir", required=True)
    e.add_argument("--tasks", default=None,
                   help="comma-separated (default: all): passkey, niah_single, niah_multikey, "
                        "niah_multivalue, variable_tracking")
    e.add_argument("--lengths", default=None,
                   help="comma-separated lengths in tokens, e.g. 1K,2K,4K (default: powers of "
                        "two from 1K up to the model's limit)")
    e.add_argument("--num_samples", type=int, default=20, help="examples per task and length")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch_size", type=int, default=4)
    e.add_argument("--out", default=None, help="output folder (default: WORKDIR/longeval)")
    e.add_argument("--gin_file", action="append", default=[],
                   help="gin files of the run (an import-hf or trained workdir needs none)")
    e.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    e.set_defaults(handler=run_longeval)

    c = sub.add_parser("streaming-heads", help="label KV heads retrieval or streaming "
                                               "(DuoAttention) on retrieval prompts")
    c.add_argument("--workdir", required=True)
    c.add_argument("--fraction", type=float, required=True,
                   help="share of the KV heads made streaming (lowest Λ-mask error first)")
    c.add_argument("--length", type=int, default=None,
                   help="calibration prompt length (default: the model's limit)")
    c.add_argument("--num_rows", type=int, default=4)
    c.add_argument("--sink_tokens", type=int, default=4)
    c.add_argument("--recent_tokens", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--gin_file", action="append", default=[])
    c.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    c.set_defaults(handler=run_streaming_heads)

    p = sub.add_parser("prefill-search", help="pick each head's MInference pattern (a_shape, "
                                              "vertical_slash, block_sparse) by attention "
                                              "recall on validation rows")
    p.add_argument("--workdir", required=True,
                   help="the model; W/prefill_search.json and W/prefill_search.gin go here")
    p.add_argument("--rows", type=int, default=4, help="calibration rows (validation split)")
    p.add_argument("--seq_len", type=int, default=None,
                   help="calibration row length (default: TrainConfig.seq_len)")
    p.add_argument("--block_size", type=int, default=64, help="tile size in tokens")
    p.add_argument("--seed", type=int, default=0, help="which validation rows")
    g = p.add_argument_group("budgets (default: MInferenceMask's; a flag or "
                             "--gin.MInferenceMask.NAME)")
    for name, help_ in BUDGET_FLAGS.items():
        g.add_argument(f"--{name}", default=None, metavar="N", help=help_)
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin files of the run (an import-hf or trained workdir needs none)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    p.set_defaults(handler=run_prefill_search)


BUDGET_FLAGS = {
    "vertical_size": "vertical_slash: key columns kept (tokens)",
    "slash_size": "vertical_slash: diagonals kept (tokens)",
    "last_q": "vertical_slash: last queries that estimate them",
    "keep_global": "vertical_slash: first tokens always among the columns",
    "keep_local": "vertical_slash: nearest diagonals always kept",
    "top_k": "block_sparse: key blocks per query block",
    "a_shape_blocks": "a_shape: local blocks",
    "sink_blocks": "every pattern: first key blocks kept",
    "local_blocks": "every pattern: blocks ending at the diagonal kept",
    "max_blocks": "every pattern: at most this many key blocks per query block",
}


def run_sample(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        cli.quiet_logging()
        prompts = list(args.prompt)
        if args.prompt_file:
            try:
                with open(args.prompt_file) as f:
                    prompts += [line.rstrip("\n") for line in f if line.strip()]
            except OSError as e:
                raise ValueError(f"--prompt_file={args.prompt_file!r}: {e.strerror}") from None
        parse_workdir_config(args.workdir, args.gin_file, bindings, args.imports)
        from sparsejax.infer.workdir import sample_workdir  # deferred: keeps the CLI's start fast
        out = sample_workdir(args.workdir, prompts, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed)
        for prompt, text in zip(prompts, out["texts"]):
            print(f"{prompt}{text}", flush=True)
        res = {"texts": out["texts"], "tokens": out["tokens"],
               "tokens_per_s": round(out["tokens_per_s"], 1), "step": out["step"]}
        if "sparse_decode" in out:  # threshold sites, and how many decode sparsely
            res["sparse_decode"] = out["sparse_decode"]
        return res
    return guarded(go)


def run_longeval(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        cli.quiet_logging()
        parse_workdir_config(args.workdir, args.gin_file, bindings, args.imports)
        # deferred: keeps the CLI's start fast
        from sparsejax.data.retrieval_tasks import TASKS
        from sparsejax.infer.longeval import longeval_workdir
        tasks = TASKS if args.tasks is None else tuple(
            t.strip() for t in args.tasks.split(",") if t.strip())
        return longeval_workdir(args.workdir, tasks=tasks, lengths=args.lengths,
                                num_samples=args.num_samples, seed=args.seed,
                                batch_size=args.batch_size, out_dir=args.out)
    return guarded(go)


def run_streaming_heads(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        cli.quiet_logging()
        parse_workdir_config(args.workdir, args.gin_file, bindings, args.imports)
        # deferred: keeps the CLI's start fast
        from sparsejax.infer.streaming_calibration import calibrate_workdir
        return calibrate_workdir(args.workdir, fraction=args.fraction, length=args.length,
                                 num_rows=args.num_rows, sink_tokens=args.sink_tokens,
                                 recent_tokens=args.recent_tokens, seed=args.seed)
    return guarded(go)


def run_prefill_search(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    def go():
        cli.quiet_logging()
        budgets = shorthand_bindings("MInferenceMask", dict.fromkeys(BUDGET_FLAGS, int), args,
                                     bindings)
        parse_workdir_config(args.workdir, args.gin_file, [*bindings, *budgets], args.imports)
        # deferred: keeps the CLI's start fast
        from sparsejax.infer.prefill_calibration import search_workdir
        return search_workdir(args.workdir, rows=args.rows, seq_len=args.seq_len,
                              block_size=args.block_size, seed=args.seed)
    return guarded(go)
