"""Ablation sweeps: a grid of gin-configured training runs (resumable, bounded parallelism),
summarized as a results table and plots. CLI: `sparsejax sweep` / `sparsejax report`."""
