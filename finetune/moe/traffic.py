"""What one layer's grouped expert kernel makes a GPU do, counted without one: matmul FLOPs, bytes moved outside
the matmuls, ops and kernel launches.

Outside its matmuls the layer is memory-bound (dequantizing the 4-bit stacks, the SwiGLU, sums, permutations), so
those bytes over the memory bandwidth are a floor on that part of its time; the ops are its host work. Counted on
meta tensors (shapes, no data), so the real 8x7B widths take a second on any machine, and as a GPU with triton
runs the layer: the Triton kernels (`finetune.moe.dequant_kernel`, the fused SwiGLU passes) stand in as launches
that allocate their outputs and count what they read and write. Each other op counts the bytes of its tensor
inputs and outputs (a view none; an op writing into its first argument does not read it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_MATMULS = {"_grouped_mm", "mm", "bmm", "addmm"}
_ALLOCATE = {"empty", "empty_like", "new_empty", "empty_strided"}  # no memory traffic
_WRITE_ONLY = {"copy_", "fill_", "zero_"}  # the first argument is written, not read


@dataclass
class Traffic:
    """One pass (a forward or a backward) of the layer."""

    ops: int = 0  # dispatched, views left out
    launches: int = 0  # of the Triton kernels
    matmul_flops: int = 0
    matmul_bytes: int = 0  # the matmuls' operands and outputs
    other_bytes: int = 0  # every other op's and launch's reads and writes
    by_op: dict[str, int] = field(default_factory=dict)  # other_bytes per op or kernel

    def add_bytes(self, name: str, nbytes: int) -> None:
        self.other_bytes += nbytes
        self.by_op[name] = self.by_op.get(name, 0) + nbytes


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _matmul_flops(name: str, args) -> int:
    """2 M K N; a grouped matmul's rows each fall in one group, whether it multiplies [M, K] rows by per-group
    [K, N] weights or sums [K, M] x [M, N] per group (a weight gradient)."""
    a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
    flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1]
    return flops * a.shape[0] if name == "bmm" else flops


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.traffic = Traffic()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        name = func.overloadpacket.__name__
        self.traffic.ops += 1
        if name in _ALLOCATE:
            return out
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in _WRITE_ONLY:
            inputs = inputs[1:]
        nbytes = _nbytes(*inputs, *(t for t in tree_leaves(out) if isinstance(t, torch.Tensor)))
        if name in _MATMULS:
            self.traffic.matmul_flops += _matmul_flops(name, args)
            self.traffic.matmul_bytes += nbytes
        else:
            self.traffic.add_bytes(name, nbytes)
        return out


@contextlib.contextmanager
def _launches_as_on_a_gpu(counters: list[_Counter]):
    """The grouped kernel's Triton launchers, as launches that allocate their outputs and count their bytes."""
    from . import grouped

    def count(name: str, nbytes: int) -> None:
        counters[-1].traffic.launches += 1
        counters[-1].traffic.add_bytes(name, nbytes)

    def dequantize(data, scales, code, out, base, strides, blocksize):
        count("strided dequantize (triton)", _nbytes(out) + out.numel() // 2 + out.numel() // blocksize * 4)
        return out

    def swiglu_forward(h, inter):
        act = h.new_empty(h.shape[0], inter)
        count("swiglu forward (triton)", _nbytes(h, act))
        return act

    def swiglu_backward(h, d_act, inter):
        dh, act = torch.empty_like(h), h.new_empty(h.shape[0], inter)
        count("swiglu backward (triton)", _nbytes(h, d_act, dh, act))
        return dh, act

    kernels = grouped.SwigluKernels(swiglu_forward, swiglu_backward)
    saved = grouped._strided_dequantizer, grouped._swiglu_kernels
    grouped._strided_dequantizer, grouped._swiglu_kernels = (lambda experts: dequantize), (lambda h: kernels)
    try:
        yield
    finally:
        grouped._strided_dequantizer, grouped._swiglu_kernels = saved


def expert_layer_traffic(num_experts: int, hidden: int, intermediate: int, rank: int, tokens: int, chunks: int,
                         top_k: int = 2) -> tuple[Traffic, Traffic]:
    """(forward, backward) of one layer's experts in the grouped kernel: 4-bit NF4 stacks, one bf16 LoRA of `rank`
    on w1/w2/w3 (0: none), `tokens` tokens each routed to `top_k` experts, `chunks` dequantization pieces."""
    from .grouped import grouped_expert_forward
    from .quantized_experts import ExpertLoraDelta, QuantizedExperts

    import bitsandbytes.functional as bnbf

    # bitsandbytes caches the 8-bit map of the double quantization on the device of its first use: make that a real
    # one, or later quantizations would find a meta tensor there
    bnbf.quantize_blockwise(torch.zeros(256), blocksize=256)
    meta, dt = torch.device("meta"), torch.bfloat16
    experts = QuantizedExperts(torch.empty(num_experts, 2 * intermediate, hidden, device=meta),
                               torch.empty(num_experts, hidden, intermediate, device=meta), act_fn=nn.SiLU(),
                               compute_dtype=dt)
    experts.dequant_chunks = chunks
    lora = []
    if rank:
        def param(*shape):
            return torch.empty(shape, device=meta).requires_grad_()

        a_shapes = {"w1": (rank, hidden), "w3": (rank, hidden), "w2": (rank, intermediate)}
        b_shapes = {"w1": (intermediate, rank), "w3": (intermediate, rank), "w2": (hidden, rank)}
        lora = [ExpertLoraDelta({p: param(num_experts, *shape) for p, shape in a_shapes.items()},
                                {p: param(num_experts, *shape) for p, shape in b_shapes.items()}, 2.0, nn.Identity())]
    x = torch.empty(tokens, hidden, device=meta, dtype=dt).requires_grad_()
    index = torch.empty(tokens, top_k, device=meta, dtype=torch.long)
    weights = torch.empty(tokens, top_k, device=meta, dtype=dt)
    counters: list[_Counter] = []
    with _launches_as_on_a_gpu(counters):
        counters.append(_Counter())
        with counters[-1]:
            y = grouped_expert_forward(x, index, weights, experts, lora)
        counters.append(_Counter())
        with counters[-1]:
            y.backward(torch.empty_like(y))
    return counters[0].traffic, counters[1].traffic
