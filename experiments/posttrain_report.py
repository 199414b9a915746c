"""The results page of experiments/posttrain.py: results/posttrain.md (the grid's tables and
the papers' numbers each between their own markers, rewritten only when their records exist,
so a `--papers_only` run keeps the grid; the text around them is kept) and
results/posttrain.png."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PAPERS_BEGIN, PAPERS_END = "<!-- papers:begin -->", "<!-- papers:end -->"
METHODS = ("magnitude", "wanda", "sparsegpt")
LEVELS = ("0.5", "0.6", "0.7", "2:4")
LABEL = {"0.5": "50%", "0.6": "60%", "0.7": "70%", "2:4": "2:4"}


def _read(path: str) -> list[dict]:
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def tables(records: list[dict], finetunes: list[dict]) -> tuple[str, dict]:
    dense = next((r for r in records if r["key"] == "dense"), None)
    pts = [r for r in records if r["key"] != "dense"]
    by = defaultdict(list)
    seeds = defaultdict(set)
    for r in pts:
        k = (r["method"], r["level"], r["dsnot"], r["allocation"])
        by[k].append(r)
        seeds[k].add(r["seed"])
    ppl = lambda rs: [r["eval_perplexity"] for r in rs]
    lines = []
    if dense:
        lines.append(f"Dense source (step {dense['step']}): eval loss {dense['eval_loss']:.4f} ± "
                     f"{dense['eval_loss_stderr']:.4f}, perplexity **{dense['eval_perplexity']:.3f}**.")
        lines.append("")
    lines.append("**Eval perplexity after one-shot pruning** (uniform allocation; mean ± sample "
                 "std over calibration seeds; seeds per cell in brackets):")
    lines.append("")
    lines.append("| method | DSnoT | " + " | ".join(LABEL[l] for l in LEVELS) + " |")
    lines.append("|---|---|" + "---|" * len(LEVELS))
    for m in METHODS:
        for ds in (False, True):
            cells = []
            for l in LEVELS:
                k = (m, l, ds, "uniform")
                s = sorted(seeds[k])
                cells.append(f"{_cell(ppl(by[k]))} [{','.join(map(str, s))}]" if s else "–")
            lines.append(f"| {m} | {'yes' if ds else 'no'} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("**Uniform vs OWL allocation** (no DSnoT; perplexity, same seeds):")
    lines.append("")
    lines.append("| method | sparsity | uniform | OWL | OWL block densities (seed 0) |")
    lines.append("|---|---|---|---|---|")
    for m in METHODS:
        for l in ("0.6", "0.7"):
            owl = by[(m, l, False, "owl")]
            u = [r for r in by[(m, l, False, "uniform")]
                 if r["seed"] in {o["seed"] for o in owl}] or by[(m, l, False, "uniform")]
            dens = next((o["block_density"] for o in owl if o["seed"] == 0), None)
            lines.append(f"| {m} | {LABEL[l]} | {_cell(ppl(u))} | {_cell(ppl(owl))} | "
                         f"{'' if dens is None else ', '.join(f'{d:.3f}' for d in dens)} |")
    if finetunes:
        lines.append("")
        steps = finetunes[0]["steps"]
        lines.append(f"**Sparse recovery fine-tune** ({steps} steps of `sparsejax train` on the "
                     "pruned workdir, masks fixed; eval loss, calibration seed 0):")
        lines.append("")
        lines.append("| method | sparsity | dense | pruned | fine-tuned (± stderr) |")
        lines.append("|---|---|---|---|---|")
        for f in finetunes:
            lines.append(f"| {f['method']} | {LABEL[f['level']]} | {f['before']:.4f} | "
                         f"{f['pruned']:.4f} | {f['finetuned']:.4f} ± {f['finetuned_stderr']:.4f} |")
    secs = defaultdict(list)
    for r in pts:
        secs[r["method"]].append(r["prune_seconds"])
    if secs:
        lines.append("")
        lines.append("Pruning time per point (calibration, solve, DSnoT; shared 2-core CPU, "
                     "compiles included): " + ", ".join(
                         f"{m} {sum(v) / len(v):.0f} s" for m, v in sorted(secs.items())) + ".")
    return "\n".join(lines), {"dense": dense, "by": by}


def plot(records: list[dict], path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dense = next((r for r in records if r["key"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"magnitude": "tab:red", "wanda": "tab:blue", "sparsegpt": "tab:green"}
    for m in METHODS:
        for ds in (False, True):
            xs, ys, es = [], [], []
            for i, l in enumerate(LEVELS):
                v = [r["eval_perplexity"] for r in records if r["key"] != "dense" and
                     r["method"] == m and r["level"] == l and r["dsnot"] == ds and
                     r["allocation"] == "uniform"]
                if v:
                    mean = sum(v) / len(v)
                    xs.append(i)
                    ys.append(mean)
                    es.append(0 if len(v) < 2 else math.sqrt(
                        sum((x - mean) ** 2 for x in v) / (len(v) - 1)))
            if xs:
                ax.errorbar(xs, ys, yerr=es, color=colors[m], marker="o", capsize=3,
                            linestyle="--" if ds else "-",
                            label=f"{m}{' + DSnoT' if ds else ''}")
    if dense:
        ax.axhline(dense["eval_perplexity"], color="k", linewidth=1, label="dense")
    ax.set_xticks(range(len(LEVELS)), [LABEL[l] for l in LEVELS])
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("eval perplexity (log scale)")
    ax.set_title("One-shot post-training pruning of base.gin (600 steps)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PAPER_TASKS = ("sj_next_line", "sj_next_token")


def papers_table(papers: list[dict]) -> str:
    """The papers' numbers: perplexity under the concat protocol on the held-out text and
    zero-shot accuracy through the lm-evaluation-harness model (calibration seed 0)."""
    if not papers:
        return ""
    window = papers[0]["window"]
    lines = [f"**The papers' numbers** (`--papers_only`; calibration seed 0): perplexity under "
             f"the SparseGPT/Wanda protocol on the held-out text (the corpus's validation files "
             f"joined with a blank line, {papers[0]['windows']} non-overlapping windows of "
             f"{window} tokens; ± is exp of the loss ± its standard error over windows, as a "
             f"range) and zero-shot accuracy (± standard error) on the local 4-choice tasks of "
             f"experiments/tasks/ through `sparsejax lm-eval`:", "",
             "| model | perplexity | " + " | ".join(PAPER_TASKS) + " |",
             "|---|---|" + "---|" * len(PAPER_TASKS)]
    for r in papers:
        name = "dense" if r["level"] is None else f"{r['method']} {LABEL[r['level']]}"
        lo, hi = (math.exp(r["loss"] - r["loss_stderr"]), math.exp(r["loss"] + r["loss_stderr"]))
        accs = " | ".join(f"{r[t + '/acc']:.3f} ± {r[t + '/acc_stderr']:.3f}"
                          for t in PAPER_TASKS)
        lines.append(f"| {name} | {r['perplexity']:.3f} ({lo:.3f}-{hi:.3f}) | {accs} |")
    return "\n".join(lines)


def _replace(page: str, begin: str, end: str, block: str) -> str:
    """`page` with the text between `begin` and `end` replaced by `block` (appended, markers
    included, when the page has no such markers)."""
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        return head + begin + "\n" + block + "\n" + end + rest.split(end, 1)[1]
    return page.rstrip() + "\n\n" + begin + "\n" + block + "\n" + end + "\n"


def write_report(out: str, results_dir: str, source: str) -> dict:
    records = _read(os.path.join(out, "results.jsonl"))
    finetunes = _read(os.path.join(out, "finetune.jsonl"))
    papers = _read(os.path.join(out, "papers.jsonl"))
    os.makedirs(results_dir, exist_ok=True)
    md = os.path.join(results_dir, "posttrain.md")
    page = (open(md).read() if os.path.isfile(md) else
            "# Post-training pruning: magnitude vs Wanda vs SparseGPT, DSnoT, OWL\n")
    png = None
    if records:
        png = plot(records, os.path.join(results_dir, "posttrain.png"))
        text, _ = tables(records, finetunes)
        command = " ".join(["sparsejax train", "--gin_file=base.gin",
                            "--gin.TrainConfig.num_steps=600"])
        page = _replace(page, BEGIN, END, "\n".join([
            f"Command: `python experiments/posttrain.py` (source: `{command}`).", "", text, "",
            "![posttrain](posttrain.png)" if png else ""]))
    if papers:
        page = _replace(page, PAPERS_BEGIN, PAPERS_END, papers_table(papers))
    with open(md, "w") as f:
        f.write(page)
    return {"markdown": md, "plot": png, "points": max(len(records) - 1, 0),
            "finetunes": len(finetunes), "papers": len(papers)}
