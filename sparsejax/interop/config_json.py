"""Reading a Hugging Face config.json: what every family module shares."""
from __future__ import annotations

from typing import Any, Mapping


def need(cfg: Mapping[str, Any], key: str) -> Any:
    """cfg[key], or a ValueError naming the key and the model_type when it is absent or null."""
    if cfg.get(key) is None:
        raise ValueError(f"config.json (model_type {cfg.get('model_type')!r}) lacks {key!r}")
    return cfg[key]
