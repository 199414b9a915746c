"""Optimizer and learning-rate schedule (warmup + cosine), with gradient clipping."""
from __future__ import annotations

import gin
import optax

from sparsejax.config import run_step
from sparsejax.sparsity.optim import scale_by_adam_per_entry

BIAS_CORRECTIONS = ("global", "per_entry")


@gin.configurable(denylist=["total_steps"])
def learning_rate_schedule(peak_lr: float = 3e-3, warmup_steps: int | float = 100,
                           total_steps: int = 1000, end_lr_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup to `peak_lr`, then cosine decay to `peak_lr * end_lr_fraction` at
    `total_steps` (the run's length). `warmup_steps` is an int (steps) or a float in [0, 1]
    (a fraction of the run)."""
    if not peak_lr > 0:
        raise ValueError(f"learning_rate_schedule.peak_lr={peak_lr} must be > 0")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    warmup_steps = run_step(warmup_steps, total_steps, "learning_rate_schedule.warmup_steps")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=min(warmup_steps, total_steps),
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak_lr * end_lr_fraction)


@gin.configurable(denylist=["total_steps"])
def make_optimizer(total_steps: int, name: str = "adamw", weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, grad_clip_norm: float | None = 1.0,
                   bias_correction: str = "global") -> optax.GradientTransformation:
    """AdamW (or SGD with momentum / Lion) with the configured schedule and global-norm clipping.

    `bias_correction` (AdamW only): 'global' counts Adam's steps once for all weights (optax);
    'per_entry' counts them per weight and restarts an entry's count when its mask changes,
    so weights grown by dynamic sparse training (RigL, SET) start as at step 1."""
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(f"make_optimizer.bias_correction={bias_correction!r} is unknown; "
                         f"valid: {list(BIAS_CORRECTIONS)}")
    if bias_correction != "global" and name != "adamw":
        raise ValueError(f"make_optimizer.bias_correction={bias_correction!r} applies to "
                         f"name='adamw' only (name={name!r} has no bias correction); use "
                         f"bias_correction='global'")
    lr = learning_rate_schedule(total_steps=total_steps)
    if name == "adamw" and bias_correction == "per_entry":
        tx = optax.chain(scale_by_adam_per_entry(b1=b1, b2=b2),
                         optax.add_decayed_weights(weight_decay),
                         optax.scale_by_learning_rate(lr))
    elif name == "adamw":
        tx = optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)
    elif name == "sgd":
        tx = optax.sgd(lr, momentum=b1)
    elif name == "lion":
        tx = optax.lion(lr, b1=b1, b2=b2, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer name={name!r} is unknown; valid: ['adamw', 'sgd', 'lion']")
    if grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx
