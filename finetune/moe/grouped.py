"""The grouped-GEMM expert kernel: a layer's routed tokens go through each projection in one grouped matmul.

Per layer call:
  - the (token, slot) rows are sorted by expert once; group offsets come from `searchsorted` on the device,
    so nothing waits on the host;
  - the 4-bit stacks are dequantized whole-expert-stack, in chunks along the intermediate dimension (an
    expert MLP is a sum over that dimension): chunk c's W1/W3 rows and W2 columns of all experts are made,
    used and freed before chunk c+1, so at most one chunk of dense weights exists at a time; on a GPU with
    triton each chunk is made in one launch (`finetune.moe.dequant_kernel`), not one call per expert;
  - products are `torch._grouped_mm` calls over the per-expert stacks. Where a LoRA product adds into a base
    product, it rides in the same matmul as extra columns: the dequantized gate/up chunk carries each adapter's
    B1/B3 rows beside it (block-diagonal) against [x | s x A1^T | s x A3^T], and in the backward the w2 chunk
    carries A2's rows below it against [dy | s dy B2]. No layer-wide LoRA product is made and added;
  - the SwiGLU is one fused pass each way on a GPU with triton (the backward's also gives the activation
    again, which the w2 LoRA gradient needs);
  - a custom autograd Function saves the layer's inputs (with the rank-r LoRA columns), the w2 LoRA's rank-r
    intermediate and the gate/up pre-activations, never a dense weight: backward dequantizes each chunk again.
The base weights are frozen: backward computes input and LoRA gradients only. `finetune.moe.traffic` counts what
it makes a GPU do (`finetune bench --traffic`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dequant_kernel import on_its_device, strided_dequantizer
from .quantized_experts import BLOCKSIZE, ExpertLoraDelta, QuantizedExperts

# Chunks of the intermediate dimension per layer call. Measured on an H100 (8x7B, seq 4096): 1 chunk 3,526 tok/s,
# 29.0 GiB peak; 2 chunks 3,318 tok/s, 27.8 GiB; 4 chunks 3,116 tok/s, 27.2 GiB.
DEFAULT_CHUNKS = 2
_LORA_PARAMS = ("w1", "w3", "w2")
FUSED_SWIGLU_ENV = "FINETUNE_FUSED_SWIGLU"  # 0: eager torch's SwiGLU on a GPU too
_SWIGLU_BLOCK_ELEMENTS = 1 << 22  # per fp32 temporary of the swiglu backward without triton (16 MiB)


def grouped_unsupported_reason(hidden_states: torch.Tensor, weights, lora: Sequence[ExpertLoraDelta]) -> str | None:
    """Why the grouped kernel cannot run these inputs, or None when it can."""
    if not isinstance(weights, QuantizedExperts):
        return "only 4-bit QuantizedExperts are handled (stock bf16 experts use the reference loop)"
    if not _is_silu(weights.act_fn):
        return f"activation {weights.act_fn!r} is not SiLU"
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    dtype, device = weights.compute_dtype, hidden_states.device
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"on CUDA the grouped matmul needs bfloat16 compute, not {dtype}"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "on CUDA the grouped matmul needs compute capability 8.0 or newer"
        # before 2.9, CUDA's grouped matmul could hang on a group of no rows (an expert without tokens) in the
        # weight gradients. (Its CUTLASS kernels are built for compute capability 9.0 and 10.0; on 8.x torch runs
        # a per-group fallback that waits on the host, slower but still one call per projection.)
        if torch.__version__ < (2, 9):
            return f"on CUDA the grouped matmul needs torch 2.9 or newer, not {torch.__version__}"
    elif device.type != "cpu":
        return f"device {device.type} is not supported"
    if weights.intermediate_dim % BLOCKSIZE:  # chunks of w2's rows (and w1/w3's) must be whole 4-bit blocks
        return f"intermediate size {weights.intermediate_dim} is not a multiple of the 4-bit block size {BLOCKSIZE}"
    # grouped matmul operands need 16-byte aligned rows
    align = 16 // torch.empty((), dtype=dtype).element_size()
    sizes = {"hidden": weights.hidden_dim, "intermediate": weights.intermediate_dim}
    sizes.update({f"LoRA rank ({i})": delta.lora_A["w1"].shape[1] for i, delta in enumerate(lora)})
    bad = [f"{name} {n}" for name, n in sizes.items() if n % align]
    if bad:
        return f"sizes not a multiple of {align} ({', '.join(bad)})"
    return None


def _is_silu(act_fn) -> bool:
    return act_fn is F.silu or isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def chunk_count(experts: QuantizedExperts, requested: int) -> int:
    """The largest count <= requested that cuts the intermediate dimension into whole 4-bit blocks."""
    inter = experts.intermediate_dim
    for chunks in range(max(1, requested), 1, -1):
        if inter % chunks == 0 and (inter // chunks) % BLOCKSIZE == 0:
            return chunks
    return 1


@dataclass(frozen=True)
class _Adapter:
    scaling: float
    dropout: float  # probability on the w2 LoRA input (the w1/w3 LoRA input is dropped outside the Function)


@dataclass(frozen=True)
class _Plan:
    experts: QuantizedExperts
    chunks: int
    dtype: torch.dtype
    adapters: tuple[_Adapter, ...]


def _dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) and module.training and module.p > 0 else 0.0


def grouped_expert_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    experts: QuantizedExperts,
    lora: Sequence[ExpertLoraDelta] = (),
) -> torch.Tensor:
    """Same contract as `reference_expert_forward`; no host synchronisation."""
    tokens, k = top_k_index.shape
    num_experts = experts.num_experts
    flat = top_k_index.reshape(-1)
    order = flat.argsort(stable=True)
    bounds = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    offs = torch.searchsorted(flat[order], bounds, right=True, out_int32=True)
    # each token repeated k times (expand + copy: its backward is a sum, no atomics), then sorted by expert
    x = hidden_states.to(experts.compute_dtype).unsqueeze(1).expand(tokens, k, -1).reshape(tokens * k, -1)[order]

    adapters, tensors = [], []
    for delta in lora:
        p = _dropout_p(delta.dropout)
        adapters.append(_Adapter(float(delta.scaling), p))
        # one mask per routed row serves w1 and w3 (the reference loop draws one each: same distribution per
        # projection); None: the w1/w3 LoRA reads x itself
        tensors.append(delta.dropout(x) if p else None)
        tensors += [delta.lora_A[p] for p in _LORA_PARAMS] + [delta.lora_B[p] for p in _LORA_PARAMS]
    plan = _Plan(experts, chunk_count(experts, experts.dequant_chunks or DEFAULT_CHUNKS),
                 experts.compute_dtype, tuple(adapters))
    y = _GroupedExpertMLP.apply(plan, x, offs, *tensors)

    # back to (token, slot) order, weighted by the router and summed over the k slots
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = y[inverse].view(tokens, k, -1) * top_k_weights.to(y.dtype).unsqueeze(-1)
    return y.sum(1).to(hidden_states.dtype)


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of group g of a [M, K] times b[g] [K, N] -> [M, N]."""
    return torch._grouped_mm(a, b, offs=offs)


def _gmm_weight_grad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Per group g: a_g^T @ b_g -> [G, Ka, Kb] (a [M, Ka], b [M, Kb]); groups without rows are exactly 0."""
    return torch._grouped_mm(a.t(), b, offs=offs).masked_fill_(empty.view(-1, 1, 1), 0)


def _swiglu(h: torch.Tensor, inter: int) -> torch.Tensor:
    """silu(gate) * up from [gate | up], in eager torch."""
    return F.silu(h[:, :inter]) * h[:, inter:]


def _swiglu_backward(h: torch.Tensor, d_act: torch.Tensor, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d[gate | up] from d(silu(gate) * up), computed in fp32, returned in h's dtype, and the activation again (the w2
    LoRA gradient needs it), in eager torch: blocks of rows, so that the fp32 temporaries stay small and only dh is
    layer-sized (whole-tensor fp32 temporaries were 10x its size at the real widths)."""
    out = torch.empty_like(h)
    block = max(1, _SWIGLU_BLOCK_ELEMENTS // inter)
    for start in range(0, h.shape[0], block):
        rows = slice(start, start + block)
        gate, up, d = h[rows, :inter].float(), h[rows, inter:].float(), d_act[rows].float()
        sig = torch.sigmoid(gate)
        out[rows, :inter] = d * up * sig * (1 + gate * (1 - sig))
        out[rows, inter:] = d * gate * sig
    return out, _swiglu(h, inter)


@dataclass(frozen=True)
class SwigluKernels:
    """The SwiGLU's forward (act from [gate | up]) and backward ((dh, act) from [gate | up] and d_act)."""

    forward: Callable[[torch.Tensor, int], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


EAGER_SWIGLU = SwigluKernels(_swiglu, _swiglu_backward)


def _swiglu_kernels(h: torch.Tensor) -> SwigluKernels:
    """Triton's fused passes on a GPU with triton (eager torch reads and writes the layer-sized tensors 3 to 5 times
    per pass, with fp32 temporaries), unless FUSED_SWIGLU_ENV is 0; else eager torch."""
    if not h.is_cuda or os.environ.get(FUSED_SWIGLU_ENV, "1") == "0":
        return EAGER_SWIGLU
    return _triton_swiglu() or EAGER_SWIGLU


@functools.cache
def _triton_swiglu() -> SwigluKernels | None:
    return make_triton_swiglu()


def make_triton_swiglu() -> SwigluKernels | None:
    """New launchers of the fused passes (each row's values computed in fp32, rounded once to h's dtype), None without
    triton; with TRITON_INTERPRET=1 in the environment, ones that run on CPU tensors."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def swiglu_fused(h_ptr, d_ptr, dh_ptr, act_ptr, inter, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
        sig = 1 / (1 + tl.exp(-gate))  # tl.sigmoid, written out: the interpreter cannot call library jit functions
        tl.store(act_ptr + row * inter + cols, (gate * sig * up).to(act_ptr.dtype.element_ty), mask=mask)
        if BACKWARD:
            d = tl.load(d_ptr + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
            dh_row = dh_ptr + row * 2 * inter
            tl.store(dh_row + cols, (d * up * sig * (1 + gate * (1 - sig))).to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dh_row + inter + cols, (d * gate * sig).to(dh_ptr.dtype.element_ty), mask=mask)

    block = 1024

    def check(h: torch.Tensor, inter: int, d_act: torch.Tensor | None = None) -> None:
        # the kernel reads and writes rows of 2 * inter and inter values unchecked: other widths would be read and
        # written past the ends on a GPU (the interpreter reads past them silently)
        if h.dim() != 2 or h.shape[1] != 2 * inter or (d_act is not None and d_act.shape != (h.shape[0], inter)):
            raise ValueError(f"expected [gate | up] of [rows, {2 * inter}] and its d_act of [rows, {inter}], got "
                             f"{tuple(h.shape)} and {None if d_act is None else tuple(d_act.shape)}")

    def forward(h: torch.Tensor, inter: int) -> torch.Tensor:
        check(h, inter)
        h = h.contiguous()
        act = h.new_empty(h.shape[0], inter)
        with on_its_device(h):
            swiglu_fused[(h.shape[0], triton.cdiv(inter, block))](h, h, h, act, inter, BACKWARD=False, BLOCK=block)
        return act

    def backward(h: torch.Tensor, d_act: torch.Tensor, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        check(h, inter, d_act)
        h = h.contiguous()
        dh, act = torch.empty_like(h), h.new_empty(h.shape[0], inter)
        with on_its_device(h):
            swiglu_fused[(h.shape[0], triton.cdiv(inter, block))](h, d_act.contiguous(), dh, act, inter,
                                                                   BACKWARD=True, BLOCK=block)
        return dh, act

    return SwigluKernels(forward, backward)


def _strided_dequantizer(experts: QuantizedExperts):
    """The one-launch dequantizer of `finetune.moe.dequant_kernel` on a GPU with triton (unless the experts' switch
    is off), else None."""
    return strided_dequantizer() if experts.strided_dequant and experts.gate_up_proj.data.is_cuda else None


def _dequantize_gate_up(experts: QuantizedExperts, scales, chunk: int, chunks: int, out: torch.Tensor,
                        strided=None) -> torch.Tensor:
    """Fill `out` [E, 2c, H] (rows may be padded) with chunk `chunk` of the w1 rows, then the same chunk of the w3
    rows, of every expert. `strided`: a launcher from `finetune.moe.dequant_kernel` (one launch, instead of one
    bitsandbytes call per expert and row group)."""
    stack, inter, hidden = experts.gate_up_proj, experts.intermediate_dim, experts.hidden_dim
    c = inter // chunks
    if strided is None:
        return stack.dequantize_rows(scales, slice(chunk * c, (chunk + 1) * c), out, groups=2)
    strided(stack.data, scales, stack.code, out.view(experts.num_experts, 2, c, hidden), chunk * c * hidden,
            (2 * inter * hidden, inter * hidden, hidden), BLOCKSIZE)
    return out


def _gate_up_weights(experts: QuantizedExperts, scales, chunk: int, chunks: int, dtype, lora_b: Sequence[tuple],
                     strided=None) -> torch.Tensor:
    """[E, 2c, H + 2r per adapter]: the dequantized chunk (`_dequantize_gate_up`) with each adapter's w1/w3 B rows of
    the chunk after it, block-diagonal (B1 beside the w1 rows, B3 beside the w3 rows, zeros elsewhere). Against
    [x | s x A1^T | s x A3^T] one grouped matmul gives the base projection plus the LoRA (no layer-sized product to
    add), and in the backward dh against the B columns gives the rank-r gradient."""
    hidden, num_experts, c = experts.hidden_dim, experts.num_experts, experts.intermediate_dim // chunks
    ranks = [b1.shape[2] for b1, _ in lora_b]
    out = torch.empty(num_experts, 2 * c, hidden + 2 * sum(ranks), dtype=dtype, device=experts.gate_up_proj.data.device)
    _dequantize_gate_up(experts, scales, chunk, chunks, out[:, :, :hidden], strided)
    rows, col = slice(chunk * c, (chunk + 1) * c), hidden
    if lora_b:
        out[:, :, hidden:].zero_()
    for (b1, b3), r in zip(lora_b, ranks):
        out[:, :c, col : col + r] = b1[:, rows]
        out[:, c:, col + r : col + 2 * r] = b3[:, rows]
        col += 2 * r
    return out


def _down_weights(experts: QuantizedExperts, scales, chunk: int, chunks: int, dtype, lora_a2: Sequence = (),
                  strided=None) -> torch.Tensor:
    """[E, H + r per adapter, c]: columns chunk*c .. (chunk+1)*c of every expert's w2, then the same columns of each
    adapter's A2 ([E, r, I]) below them. Against [dy | s dy B2] one grouped matmul gives the activation's gradient
    with the w2 LoRA's share (the backward). `strided`: as for `_dequantize_gate_up`, reading the columns where
    they lie instead of from a gathered copy of their packed bytes."""
    stack, inter, hidden = experts.down_proj, experts.intermediate_dim, experts.hidden_dim
    num_experts, c = experts.num_experts, inter // chunks
    extra = sum(a2.shape[1] for a2 in lora_a2)
    if not extra and (strided is None or chunks == 1):  # bitsandbytes' call (1 chunk: the stack is one run)
        return stack.dequantize_part(scales, (hidden, chunks), (slice(None), chunk), (num_experts, hidden, c), dtype)
    out = torch.empty(num_experts, hidden + extra, c, dtype=dtype, device=stack.data.device)
    if strided is not None:
        strided(stack.data, scales, stack.code, out[:, :hidden].unsqueeze(1), chunk * c, (hidden * inter, 0, inter),
                BLOCKSIZE)
    else:
        stack.dequantize_columns(scales, chunk, chunks, out[:, :hidden])
    row = hidden
    for a2 in lora_a2:
        out[:, row : row + a2.shape[1]] = a2[:, :, chunk * c : (chunk + 1) * c]
        row += a2.shape[1]
    return out


def _adapter_tensors(plan: _Plan, tensors: Sequence) -> list[dict]:
    """Per adapter: the w1/w3 LoRA input (or None: the Function's x) and A/B per projection."""
    out = []
    for i in range(len(plan.adapters)):
        t = tensors[7 * i : 7 * i + 7]
        out.append({"x": t[0], "A": dict(zip(_LORA_PARAMS, t[1:4])), "B": dict(zip(_LORA_PARAMS, t[4:7]))})
    return out


class _GroupedExpertMLP(torch.autograd.Function):
    """y = W2 (silu(W1 x) * W3 x) per sorted row's expert, each projection plus s * B (A x) per adapter."""

    @staticmethod
    def forward(ctx, plan: _Plan, x: torch.Tensor, offs: torch.Tensor, *tensors):
        experts, chunks, dt = plan.experts, plan.chunks, plan.dtype
        inter = experts.intermediate_dim // chunks
        adapters = _adapter_tensors(plan, tensors)
        gate_up_scales, down_scales = experts.gate_up_proj.block_scales(), experts.down_proj.block_scales()
        strided, swiglu = _strided_dequantizer(experts), _swiglu_kernels(x)
        lora_b = [(a["B"]["w1"], a["B"]["w3"]) for a in adapters]
        a2 = [a["A"]["w2"].to(dt) for a in adapters]  # [E, r, I]: a chunk's columns are a matmul operand as they lie

        # [x | s x A1^T | s x A3^T per adapter]: the gate/up matmul against `_gate_up_weights` adds the LoRA
        x_lora = [x]
        for a, spec in zip(adapters, plan.adapters):
            a13 = torch.cat([a["A"]["w1"], a["A"]["w3"]], 1).to(dt).transpose(1, 2)
            x_lora.append(_gmm(a["x"] if a["x"] is not None else x, a13, offs).mul_(spec.scaling))
        x_lora = torch.cat(x_lora, 1) if adapters else x
        aa2 = [None] * len(adapters)
        hidden, masks, y = [], [], None
        for c in range(chunks):
            rows = slice(c * inter, (c + 1) * inter)
            w13 = _gate_up_weights(experts, gate_up_scales, c, chunks, dt, lora_b, strided)
            h = _gmm(x_lora, w13.transpose(1, 2), offs)
            del w13
            hidden.append(h)
            act = swiglu.forward(h, inter)
            for j, spec in enumerate(plan.adapters):
                if spec.dropout:
                    # a bool mask drawn as such (no float32 draw of the activation's size); 1 / (1 - p) is applied
                    # to the rank-r product
                    keep = torch.empty_like(act, dtype=torch.bool).bernoulli_(1 - spec.dropout)
                    masks.append(keep)
                    part = _gmm(act * keep, a2[j][:, :, rows].transpose(1, 2), offs).float()
                    part.mul_(1 / (1 - spec.dropout))
                else:
                    part = _gmm(act, a2[j][:, :, rows].transpose(1, 2), offs).float()
                aa2[j] = part if aa2[j] is None else aa2[j].add_(part)
            w2 = _down_weights(experts, down_scales, c, chunks, dt, strided=strided)
            part = _gmm(act, w2.transpose(1, 2), offs)
            del w2, act
            y = part if y is None else y.add_(part)  # bf16 sum of the chunks' partial products
        aa2 = [t.to(dt) for t in aa2]
        for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
            y = y.add_(_gmm(aa2[j], a["B"]["w2"].to(dt).transpose(1, 2), offs), alpha=spec.scaling)

        ctx.plan = plan
        ctx.save_for_backward(x_lora, offs, *(t for t in tensors), *aa2, *hidden, *masks)
        return y.to(dt)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        plan = ctx.plan
        experts, chunks, dt = plan.experts, plan.chunks, plan.dtype
        inter, hidden_dim = experts.intermediate_dim // chunks, experts.hidden_dim
        n = len(plan.adapters)
        saved = list(ctx.saved_tensors)
        x_lora, offs = saved[0], saved[1]
        tensors, rest = saved[2 : 2 + 7 * n], saved[2 + 7 * n :]
        aa2, hidden, masks = rest[:n], rest[n : n + chunks], rest[n + chunks :]
        x = x_lora[:, :hidden_dim]
        adapters = _adapter_tensors(plan, tensors)
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
        gate_up_scales, down_scales = experts.gate_up_proj.block_scales(), experts.down_proj.block_scales()
        strided, swiglu = _strided_dequantizer(experts), _swiglu_kernels(dy)
        lora_b = [(a["B"]["w1"], a["B"]["w3"]) for a in adapters]
        a2 = [a["A"]["w2"].to(dt) for a in adapters]
        # each adapter's columns of x_lora (its s x A13^T) and of the gate/up weights (its B13)
        lora_cols, col = [], 0
        for a in adapters:
            r = a["A"]["w1"].shape[1]
            lora_cols.append(slice(col, col + 2 * r))
            col += 2 * r
        dy = dy.to(dt).contiguous()

        grads = [{"x": None, "A": {}, "B": {}} for _ in adapters]
        daa2, dxa, parts = [], [None] * n, [{"A2": [], "B1": [], "B3": []} for _ in adapters]
        for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
            grads[j]["B"]["w2"] = _gmm_weight_grad(dy, aa2[j], offs, empty).mul_(spec.scaling)
            daa2.append(_gmm(dy, a["B"]["w2"].to(dt), offs).mul_(spec.scaling))
        # [dy | s dy B2^T per adapter] against `_down_weights` with the A2 rows: the w2 LoRA's share of the activation
        # gradient comes out of the base matmul (not for an adapter with dropout: its share is masked)
        unmasked = [j for j, spec in enumerate(plan.adapters) if not spec.dropout]
        dy_lora = torch.cat([dy, *(daa2[j] for j in unmasked)], 1) if unmasked else dy
        dx, mask_iter = None, iter(masks)
        for c in range(chunks):
            rows = slice(c * inter, (c + 1) * inter)
            w2 = _down_weights(experts, down_scales, c, chunks, dt, [a2[j] for j in unmasked], strided)
            d_act = _gmm(dy_lora, w2, offs)
            del w2
            keeps = [next(mask_iter) if spec.dropout else None for spec in plan.adapters]
            for j, spec in enumerate(plan.adapters):
                if spec.dropout:
                    d_act.add_(_gmm(daa2[j] / (1 - spec.dropout), a2[j][:, :, rows], offs).mul_(keeps[j]))
            dh, act = swiglu.backward(hidden[c], d_act, inter)
            del d_act
            for j, spec in enumerate(plan.adapters):
                if spec.dropout:
                    da2 = _gmm_weight_grad(daa2[j], act * keeps[j], offs, empty).mul_(1 / (1 - spec.dropout))
                else:
                    da2 = _gmm_weight_grad(daa2[j], act, offs, empty)
                parts[j]["A2"].append(da2)
            del act
            w13 = _gate_up_weights(experts, gate_up_scales, c, chunks, dt, lora_b, strided)
            part = _gmm(dh, w13[:, :, :hidden_dim], offs)
            dx = part if dx is None else dx.add_(part)
            d_lora = _gmm(dh, w13[:, :, hidden_dim:], offs) if n else None  # d(s x A13^T), every adapter's columns
            del w13
            for j, (cols, spec) in enumerate(zip(lora_cols, plan.adapters)):
                # x_lora holds s x A13^T: dh^T against it is the B gradient, scaling included
                db = _gmm_weight_grad(dh, x_lora[:, hidden_dim + cols.start : hidden_dim + cols.stop], offs, empty)
                r = db.shape[2] // 2
                parts[j]["B1"].append(db[:, :inter, :r])
                parts[j]["B3"].append(db[:, inter:, r:])
                d = d_lora[:, cols].float().mul_(spec.scaling)
                dxa[j] = d if dxa[j] is None else dxa[j].add_(d)

        out = []
        for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
            lora_x = a["x"] if a["x"] is not None else x
            d = dxa[j].to(dt)
            da13 = _gmm_weight_grad(d, lora_x, offs, empty)
            r = da13.shape[1] // 2
            g = grads[j]
            g["A"]["w1"], g["A"]["w3"] = da13[:, :r], da13[:, r:]
            g["A"]["w2"] = torch.cat(parts[j]["A2"], 2)
            g["B"]["w1"], g["B"]["w3"] = torch.cat(parts[j]["B1"], 1), torch.cat(parts[j]["B3"], 1)
            d_lora_x = _gmm(d, torch.cat([a["A"]["w1"], a["A"]["w3"]], 1).to(dt), offs)
            if a["x"] is None:
                dx.add_(d_lora_x)
            else:
                g["x"] = d_lora_x
            out.append(g["x"])
            out += [g["A"][p].to(a["A"][p].dtype) for p in _LORA_PARAMS]
            out += [g["B"][p].to(a["B"][p].dtype) for p in _LORA_PARAMS]
        return None, dx.to(dt), None, *out
