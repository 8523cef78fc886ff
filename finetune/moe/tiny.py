"""A seeded tiny Mixtral checkpoint on disk, laid out like the real one (safetensors, original key names)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_MIXTRAL = dict(
    vocab_size=32000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    # 1/sqrt(hidden_size) instead of the 0.02 meant for 4096 wide models: at width 64 a 0.02 head caps every
    # logit near 1, so no adapter could make the model confident and the loss would barely move
    initializer_range=0.088,
)


def build_tiny_mixtral(
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
    **overrides: Any,
) -> Path:
    """Save a randomly initialised MixtralForCausalLM (TINY_MIXTRAL updated by `overrides`) to `path`.

    bf16 on disk by default, like real checkpoints; a small `max_shard_size` gives several shards and an index.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{**TINY_MIXTRAL, **overrides})
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(dtype)
    model.save_pretrained(Path(path), max_shard_size=max_shard_size)
    return Path(path)
