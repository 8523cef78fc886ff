"""Mixtral's RMSNorm with the same output and a lighter backward: it keeps its input as it came, not in float32.

transformers' `MixtralRMSNorm` casts its input to float32 and autograd keeps that copy for the backward: twice
the bytes of the input, per norm, while the layer's graph lives (two norms a layer, and the final norm through
the whole backward: 64 MiB each at 4k tokens of 8x7B in bf16). `LeanRMSNorm` computes the forward with the
very same operations (the output is bit for bit the stock one) and keeps the input in its own dtype plus one
float32 scale per token; the backward recomputes the normalized rows from them. Frozen weights only (LoRA never
trains a norm); with a trainable weight it runs the stock forward.
"""
from __future__ import annotations

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # the stock forward's operations in its order, so the output matches it exactly
        x32 = x.to(torch.float32)
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * inv_rms).to(x.dtype)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(torch.float32) * inv_rms
        # the gradient reaching the float32 normalized rows as autograd forms it: weight * grad in the product's
        # dtype, rounded to the input's dtype (the cast's output), then widened
        d_normed = (weight * grad).to(x.dtype).to(torch.float32)
        dx = inv_rms * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
        return dx.to(x.dtype), None, None


class LeanRMSNorm(nn.Module):
    """Drop-in for `MixtralRMSNorm` sharing its weight (same parameter name: state dicts are unchanged)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            x32 = hidden_states.to(torch.float32)
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * x32.to(hidden_states.dtype)
        return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def use_lean_rms_norms(model: nn.Module) -> int:
    """Replace every Mixtral RMSNorm in `model` by a `LeanRMSNorm` on the same weight; returns how many."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    stock = [(name, m) for name, m in model.named_modules() if isinstance(m, MixtralRMSNorm)]
    for name, norm in stock:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, LeanRMSNorm(norm.weight, norm.variance_epsilon))
    return len(stock)
