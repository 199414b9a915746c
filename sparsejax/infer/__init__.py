"""Inference: KV cache, jitted prefill + decode, sampling (`sparsejax sample`)."""
from sparsejax.infer.generate import generate  # noqa: F401
