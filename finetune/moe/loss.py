"""Next-token cross-entropy without the full logits: the head and the softmax run chunk by chunk.

Mixtral's head maps 4096 -> 32000: at 4k tokens the logits are 0.25 GiB in bf16 and transformers' loss
makes fp32 copies of them (and their gradient) on top. Here each chunk's logits exist only while that
chunk's loss is computed, and again in backward (checkpointed), so the transient is one chunk's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(hidden: torch.Tensor, target: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, head_weight).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Mean cross-entropy of labels[:, 1:] given hidden_states[:, :-1] [B, T, H] (transformers' shift and mean)."""
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    target = labels[:, 1:].reshape(-1).to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_chunk_loss, hidden[start:stop], target[start:stop], head_weight, use_reentrant=False)
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    """The loss of a (peft-wrapped) MixtralForCausalLM through its decoder and head, with the chunked loss."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=input_ids).last_hidden_state
    return chunked_causal_lm_loss(hidden, causal_lm.lm_head.weight, labels, chunk_tokens)
