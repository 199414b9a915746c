"""Hugging Face interop: import (`sparsejax import-hf`) and export (`sparsejax export-hf`) of
Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE checkpoints (config.json + safetensors), with
no torch in the path; the lm-evaluation-harness model `sparsejax` (`lm_eval_model.py`, the
only module that imports lm_eval)."""
