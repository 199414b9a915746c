"""Activation sparsity: the regularizer that induces it (ProSparse), the metrics that
measure it (zero / below-threshold / chunk-level fractions, PPL-p%), and training-free
thresholding (TEAL, CATS, WINA) calibrated per layer. The activations themselves are
model settings (`ModelConfig.mlp_activation`, models/activations.py); the decode path that
skips inactive neurons is in sparsejax/infer/."""
