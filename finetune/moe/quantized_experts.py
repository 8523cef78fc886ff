"""Mixtral expert stacks held in 4-bit, and the one seam through which every expert computation goes.

`expert_forward` picks the kernel: the grouped-GEMM one (`finetune.moe.grouped`) where it is supported,
else `reference_expert_forward` (a loop over routed experts, one expert's weights dequantized at a time),
which stays as the correctness reference. Both read the same packed stacks (`Packed4bitStack`) and the same
stacked LoRA tensors. Force one with `kernel=` here, `set_expert_kernel(model, ...)` on a model, or the
environment variable FINETUNE_EXPERT_KERNEL (auto, grouped, reference).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Projection = Literal["gate_up", "down"]
QuantType = Literal["nf4", "fp4"]
ExpertKernel = Literal["auto", "grouped", "reference"]
EXPERT_KERNELS = ("auto", "grouped", "reference")
KERNEL_ENV = "FINETUNE_EXPERT_KERNEL"
BLOCKSIZE = 64
_NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size for the double-quantized absmax


class Packed4bitStack(nn.Module):
    """An [E, out, in] weight stack quantized as ONE bitsandbytes 4-bit tensor (blockwise, blocksize 64).

    Because each expert's slice is a whole number of blocks, expert `e` can be dequantized alone from a
    slice of the packed data and of the absmax: no dense copy of the stack ever exists.

    The packed data and the block scales (the bulk: about 95% of Mixtral's bytes) are frozen parameters, not
    buffers, so FSDP2 shards them like any other weight: each process holds 1/N of them between layers and
    the layer's forward and backward see them whole (FSDP2 gathers mixed-dtype groups as bytes, so uint8 needs
    no float disguise, and `.to(dtype)` leaves uint8 alone). The small codebooks stay buffers. None of it
    is in `state_dict()`: the stack is rebuilt from the base checkpoint, never saved with an adapter or a
    trainer checkpoint.
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
        self.data = nn.Parameter(packed.reshape(-1), requires_grad=False)
        self.absmax = nn.Parameter(state.absmax, requires_grad=False)
        self.register_buffer("code", state.code, persistent=False)
        if double_quant:
            self.register_buffer("nested_absmax", state.state2.absmax, persistent=False)
            self.register_buffer("nested_code", state.state2.code, persistent=False)
            self.register_buffer("offset", state.offset.reshape(1), persistent=False)

    def _apply(self, fn, recurse=True):
        """Moves, never casts: a model-wide `.to(bfloat16)` would otherwise round the float32 codebooks and scales."""
        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(move_only, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Nothing: the packed stack comes from the base checkpoint (see the class docstring)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Nothing to load, nothing missing (see `_save_to_state_dict`)."""

    @property
    def expert_numel(self) -> int:
        return self.shape[1] * self.shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

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

    def block_scales(self) -> torch.Tensor:
        """Float32 scale of every block of the stack (the double quantization undone once, for all experts)."""
        if not self.double_quant:
            return self.absmax.float()
        import bitsandbytes.functional as bnbf

        scales = bnbf.dequantize_blockwise(
            self.absmax, absmax=self.nested_absmax, code=self.nested_code, blocksize=_NESTED_BLOCKSIZE
        )
        return scales.float() + self.offset

    def dequantize_part(
        self, scales: torch.Tensor, split: tuple[int, ...], index: tuple, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Dense `shape` from the blocks that `index` picks when every expert's data is viewed as [*split, -1].

        E.g. split (2, P), index (slice(None), c): chunk c of the w1 rows and of the w3 rows of every expert.
        The picked pieces must be whole blocks (the caller checks); `scales` is `block_scales()`.
        """
        num_experts = self.shape[0]
        pick = (slice(None), *index)
        data = self.data.view(num_experts, *split, -1)[pick].contiguous()
        absmax = scales.view(num_experts, *split, -1)[pick].contiguous()
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            data.view(-1), absmax.view(-1), BLOCKSIZE, self.quant_type, shape, dtype
        )

    def dequantize_rows(self, scales: torch.Tensor, rows: slice, out: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Fill `out` [E, groups * n, in] (n = len(rows); its rows may be padded: a view of wider rows) with rows
        `rows` of each of the `groups` equal row groups of every expert (groups=2 on gate_up: the same rows of w1
        and of w3), dequantized from the packed data where it lies (each expert's group is one contiguous run of
        blocks: one call each). `scales` is `block_scales()`."""
        num_experts, out_features, in_features = self.shape
        group_rows, n = out_features // groups, rows.stop - rows.start
        for e in range(num_experts):
            for g in range(groups):
                start = (e * out_features + g * group_rows + rows.start) * in_features
                stop = start + n * in_features
                args = (self.data[start // 2 : stop // 2], scales[start // BLOCKSIZE : stop // BLOCKSIZE], BLOCKSIZE,
                        self.quant_type, (n, in_features), out.dtype)
                piece = out[e, g * n : (g + 1) * n]
                if out.is_cuda and piece.is_contiguous():  # bitsandbytes writes into contiguous memory on CUDA only
                    torch.ops.bitsandbytes.dequantize_4bit.out(*args, out=piece)
                else:
                    piece.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(*args))
        return out

    def dequantize_columns(self, scales: torch.Tensor, chunk: int, chunks: int, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` [E, out_features, in / chunks] (each expert's block contiguous; the blocks may be spaced wider)
        with column chunk `chunk` of every expert, one expert at a time: a gathered copy of one expert's packed
        bytes at most, and no second dense chunk. `scales` is `block_scales()`."""
        num_experts, out_features, _ = self.shape
        data = self.data.view(num_experts, out_features, chunks, -1)[:, :, chunk]
        absmax = scales.view(num_experts, out_features, chunks, -1)[:, :, chunk]
        for e in range(num_experts):
            # contiguous, not reshape: one block per row's chunk would leave a strided 1-D view of the scales
            args = (data[e].contiguous().view(-1), absmax[e].contiguous().view(-1), BLOCKSIZE, self.quant_type,
                    tuple(out.shape[1:]), out.dtype)
            if out.is_cuda and out[e].is_contiguous():
                torch.ops.bitsandbytes.dequantize_4bit.out(*args, out=out[e])
            else:
                out[e].copy_(torch.ops.bitsandbytes.dequantize_4bit.default(*args))
        return out

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
    """Drop-in for transformers' `MixtralExperts` with both stacks in 4-bit; frozen (no trainable parameters).

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
        self.kernel: ExpertKernel = "auto"
        self.dequant_chunks: int | None = None  # the grouped kernel's pieces per stack; None: its default
        # on a GPU with triton, the grouped kernel makes each piece in one launch (`finetune.moe.dequant_kernel`);
        # False: with bitsandbytes' dequantize, one call per expert and row group
        self.strided_dequant = True
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


def set_expert_kernel(model: nn.Module, kernel: ExpertKernel) -> int:
    """Pin the expert kernel of every `QuantizedExperts` in `model` (kept through checkpoint recomputation,
    unlike a context manager around the forward); returns how many were set."""
    if kernel not in EXPERT_KERNELS:
        raise ValueError(f"expert kernel must be one of {EXPERT_KERNELS}, got {kernel!r}")
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    for m in experts:
        m.kernel = kernel
    return len(experts)


def set_expert_chunks(model: nn.Module, chunks: int | None) -> int:
    """Set the grouped kernel's dequantization pieces (None: its default) on every `QuantizedExperts` in `model`;
    returns how many were set."""
    if chunks is not None and chunks < 1:
        raise ValueError(f"expert chunks must be 1 or more, got {chunks}")
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    for m in experts:
        m.dequant_chunks = chunks
    return len(experts)


def _requested_kernel(weights: ExpertWeights, kernel: ExpertKernel | None) -> ExpertKernel:
    """The argument, else the module's pinned kernel, else the environment variable, else auto."""
    for choice in (kernel, getattr(weights, "kernel", "auto")):
        if choice not in (None, "auto"):
            break
    else:
        choice = os.environ.get(KERNEL_ENV, "auto") or "auto"
    if choice not in EXPERT_KERNELS:
        raise ValueError(f"expert kernel must be one of {EXPERT_KERNELS}, got {choice!r} (from {KERNEL_ENV}?)")
    return choice


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
    kernel: ExpertKernel | None = None,
) -> torch.Tensor:
    """Sum over the routed experts of top_k_weight * (W2_e (act(W1_e x) * W3_e x)), LoRA deltas added per projection.

    hidden_states [T, H], top_k_index/top_k_weights [T, k] -> [T, H]. The kernel seam: "grouped" where
    supported (an error if forced and unsupported), "reference" otherwise or when asked.
    """
    requested = _requested_kernel(weights, kernel)
    if requested != "reference":
        from .grouped import grouped_expert_forward, grouped_unsupported_reason

        reason = grouped_unsupported_reason(hidden_states, weights, lora)
        if reason is None:
            return grouped_expert_forward(hidden_states, top_k_index, top_k_weights, weights, lora)
        if requested == "grouped":
            raise ValueError(f"grouped expert kernel unavailable: {reason}")
    return reference_expert_forward(hidden_states, top_k_index, top_k_weights, weights, lora)


def reference_expert_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights: ExpertWeights,
    lora: Sequence[ExpertLoraDelta] = (),
) -> torch.Tensor:
    """The reference loop: one routed expert at a time (one host sync per call, for the routing counts)."""
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
