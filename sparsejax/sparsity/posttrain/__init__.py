"""Post-training sparsification of trained and imported models (`sparsejax prune`).

The methods are registered pieces of the sparsity library: scores in `CRITERIA` (magnitude,
wanda, gblm), structures in `STRUCTURES`, layer solvers in `PRUNERS` (solvers.py:
magnitude, wanda, gblm, sparsegpt), per-block densities in `ALLOCATIONS` (uniform, owl),
MoE reductions in `EXPERT_REDUCERS` (frequency, reconstruction, merge), and DSnoT's mask
refinement (dsnot.py). `driver.prune_model` calibrates and prunes block by block
(capture.py runs the blocks and reads their layers' inputs, stats.py accumulates them);
workdir.py and commands.py make it the `prune` command; recovery.py's `fixed_masks`
method fine-tunes the result with its masks fixed.
"""
