"""Inference: KV cache, jitted prefill + decode, sampling (`sparsejax sample`)."""
