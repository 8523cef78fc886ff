"""Mixtral's RMSNorm with the same output and a lighter backward: it keeps its input as it came, not in float32.

transformers' `MixtralRMSNorm` casts its input to float32 and autograd keeps that copy for the backward: twice
the bytes of the input, per norm, while the layer's graph lives (two norms a layer, and the final norm through
the whole backward: 64 MiB each at 4k tokens of 8x7B in bf16). `LeanRMSNorm` computes the forward and the
backward with the very same operations as autograd does on the stock one (output and gradient are bit for bit
the stock ones) and keeps the input in its own dtype plus one float32 scale per token. Frozen weights only (LoRA never
trains a norm); with a trainable weight, or a float32 input (nothing to save there), it runs the stock forward.
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
        # the stock graph's backward, op for op, so the gradient is bit for bit autograd's: y = w * n.to(dtype),
        # n = x32 * r, r = rsqrt(v + eps), v = mean(x32^2)
        x, weight, inv_rms = ctx.saved_tensors
        x32 = x.to(torch.float32)
        d_normed = (weight * grad).to(x.dtype).to(torch.float32)  # through the multiply and the cast
        d_inv_rms = (d_normed * x32).sum(-1, keepdim=True)
        d_variance = -0.5 * d_inv_rms * inv_rms.pow(3)
        d_squares = d_variance.expand_as(x32) / x32.shape[-1]
        dx = d_normed * inv_rms + d_squares * (2 * x32)
        return dx.to(x.dtype), None, None


class LeanRMSNorm(nn.Module):
    """Drop-in for `MixtralRMSNorm` sharing its weight (same parameter name: state dicts are unchanged)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # float32 input: the stock norm makes no copy to keep (its cast returns the input itself), and inside a
        # model autograd would add its two partial gradients to the input's others in another order
        if self.weight.requires_grad or hidden_states.dtype == torch.float32:
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
