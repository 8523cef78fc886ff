"""Mixtral expert stacks held in 4-bit, and the one seam through which every expert computation goes.

`expert_forward` is the reference implementation (a loop over routed experts, one expert's weights
dequantized at a time). A grouped-GEMM kernel replaces it later; it reads the same packed stacks
(`Packed4bitStack`) and the same stacked LoRA tensors, so neither format changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Projection = Literal["gate_up", "down"]
QuantType = Literal["nf4", "fp4"]
BLOCKSIZE = 64
_NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size for the double-quantized absmax


class Packed4bitStack(nn.Module):
    """An [E, out, in] weight stack quantized as ONE bitsandbytes 4-bit tensor (blockwise, blocksize 64).

    Because each expert's slice is a whole number of blocks, expert `e` can be dequantized alone from a
    slice of the packed data and of the absmax: no dense copy of the stack ever exists. Tensors are
    non-persistent buffers so `.to(device)` moves them and `state_dict()` (which peft and trainers walk)
    does not see them.
    """

    def __init__(self, stack: torch.Tensor, quant_type: QuantType, double_quant: bool) -> None:
        import bitsandbytes.functional as bnbf

        super().__init__()
        num_experts, out_features, in_features = stack.shape
        if (out_features * in_features) % BLOCKSIZE:
            raise ValueError(f"expert size {out_features}x{in_features} is not a multiple of the block size {BLOCKSIZE}")
        packed, state = bnbf.quantize_4bit(
            stack.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type
        )
        self.shape = (num_experts, out_features, in_features)
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.register_buffer("data", packed, persistent=False)
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.register_buffer("code", state.code, persistent=False)
        if double_quant:
            self.register_buffer("nested_absmax", state.state2.absmax, persistent=False)
            self.register_buffer("nested_code", state.state2.code, persistent=False)
            self.register_buffer("offset", state.offset.reshape(1), persistent=False)

    @property
    def expert_numel(self) -> int:
        return self.shape[1] * self.shape[2]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def expert_absmax(self, expert: int) -> torch.Tensor:
        """Float32 block scales of one expert (undoing the double quantization for its blocks only)."""
        per_expert = self.expert_numel // BLOCKSIZE
        start, stop = expert * per_expert, (expert + 1) * per_expert
        if not self.double_quant:
            return self.absmax[start:stop].float()
        import bitsandbytes.functional as bnbf

        first, last = start // _NESTED_BLOCKSIZE, -(-stop // _NESTED_BLOCKSIZE)
        codes = self.absmax[first * _NESTED_BLOCKSIZE : last * _NESTED_BLOCKSIZE]
        scales = bnbf.dequantize_blockwise(
            codes, absmax=self.nested_absmax[first:last], code=self.nested_code, blocksize=_NESTED_BLOCKSIZE
        )
        lo = start - first * _NESTED_BLOCKSIZE
        return scales[lo : lo + per_expert].float() + self.offset

    def dequantize_expert(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        half = self.expert_numel // 2  # two 4-bit values per byte
        packed = self.data[expert * half : (expert + 1) * half]
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            packed, self.expert_absmax(expert), BLOCKSIZE, self.quant_type, self.shape[1:], dtype
        )

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole dense stack: for export and tests only (that is the memory this class exists to avoid)."""
        return torch.stack([self.dequantize_expert(e, dtype) for e in range(self.shape[0])])


class ExpertWeights(Protocol):
    """What `expert_forward` needs from an expert container: the frozen projections and the activation."""

    num_experts: int
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    def project(self, x: torch.Tensor, which: Projection, expert: int) -> torch.Tensor: ...


class _FrozenExpertLinear(torch.autograd.Function):
    """x @ W_e^T with W_e dequantized in forward AND again in backward, so autograd never holds a dense
    expert weight (the saved state is the packed stack, which is alive anyway)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stack: Packed4bitStack, expert: int) -> torch.Tensor:
        ctx.stack, ctx.expert = stack, expert
        return F.linear(x, stack.dequantize_expert(expert, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.stack.dequantize_expert(ctx.expert, grad.dtype)
        return grad @ weight, None, None


class QuantizedExperts(nn.Module):
    """Drop-in for transformers' `MixtralExperts` with both stacks in 4-bit; frozen (no parameters).

    gate_up_proj: [E, 2I, H] (w1 rows then w3 rows), down_proj: [E, H, I], as in transformers 5.
    """

    def __init__(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        *,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        quant_type: QuantType = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.num_experts, two_inter, self.hidden_dim = gate_up.shape
        self.intermediate_dim = two_inter // 2
        self.compute_dtype = compute_dtype
        self.act_fn = act_fn
        self.gate_up_proj = Packed4bitStack(gate_up, quant_type, double_quant)
        self.down_proj = Packed4bitStack(down, quant_type, double_quant)

    @property
    def weight(self) -> torch.Tensor:
        """The packed gate_up stack (uint8), like `Linear4bit.weight`: peft reads `.weight` for device placement."""
        return self.gate_up_proj.data

    def project(self, x: torch.Tensor, which: Projection, expert: int) -> torch.Tensor:
        stack = self.gate_up_proj if which == "gate_up" else self.down_proj
        return _FrozenExpertLinear.apply(x.to(self.compute_dtype), stack, expert)

    def nbytes(self) -> int:
        return self.gate_up_proj.nbytes() + self.down_proj.nbytes()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return expert_forward(hidden_states, top_k_index, top_k_weights, self)

    def extra_repr(self) -> str:
        q = self.gate_up_proj
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, " \
               f"quant={q.quant_type}, double_quant={q.double_quant}, compute_dtype={self.compute_dtype}"


class StockExpertWeights:
    """`ExpertWeights` view of transformers' bf16/f32 `MixtralExperts` (plain autograd through the slices)."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn

    def project(self, x: torch.Tensor, which: Projection, expert: int) -> torch.Tensor:
        stack = self.experts.gate_up_proj if which == "gate_up" else self.experts.down_proj
        return F.linear(x.to(stack.dtype), stack[expert])


def expert_weights_of(experts: nn.Module) -> ExpertWeights:
    return experts if isinstance(experts, QuantizedExperts) else StockExpertWeights(experts)


@dataclass(frozen=True)
class ExpertLoraDelta:
    """One adapter's stacked per-expert LoRA: lora_A[p] [E, r, in], lora_B[p] [E, out, r] for p in w1, w3, w2."""

    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]
    scaling: float
    dropout: Callable[[torch.Tensor], torch.Tensor]

    def apply(self, x: torch.Tensor, proj: str, expert: int) -> torch.Tensor:
        a, b = self.lora_A[proj][expert], self.lora_B[proj][expert]
        return F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scaling


def _routing(top_k_index: torch.Tensor, num_experts: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, token rows, top-k slot) for every expert that received at least one token."""
    flat = top_k_index.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync per layer
    groups, start = [], 0
    k = top_k_index.shape[1]
    for expert, n in enumerate(counts):
        if n:
            idx = order[start : start + n]
            groups.append((expert, idx // k, idx % k))
        start += n
    return groups


def expert_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights: ExpertWeights,
    lora: Sequence[ExpertLoraDelta] = (),
) -> torch.Tensor:
    """Sum over the routed experts of top_k_weight * (W2_e (act(W1_e x) * W3_e x)), LoRA deltas added per projection.

    hidden_states [T, H], top_k_index/top_k_weights [T, k] -> [T, H]. Reference loop; the kernel seam.
    """
    out = torch.zeros_like(hidden_states)
    for expert, rows, slot in _routing(top_k_index, weights.num_experts):
        x = hidden_states[rows]
        gate, up = weights.project(x, "gate_up", expert).chunk(2, dim=-1)
        for delta in lora:
            gate = gate + delta.apply(x, "w1", expert).to(gate.dtype)
            up = up + delta.apply(x, "w3", expert).to(up.dtype)
        h = weights.act_fn(gate) * up
        y = weights.project(h, "down", expert)
        for delta in lora:
            y = y + delta.apply(h, "w2", expert).to(y.dtype)
        y = y * top_k_weights[rows, slot, None].to(y.dtype)
        out.index_add_(0, rows, y.to(out.dtype))
    return out
