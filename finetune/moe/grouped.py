"""The grouped-GEMM expert kernel: a layer's routed tokens go through each projection in one grouped matmul.

Per layer call:
  - the (token, slot) rows are sorted by expert once; group offsets come from `searchsorted` on the device,
    so nothing waits on the host;
  - the 4-bit stacks are dequantized whole-expert-stack, in chunks along the intermediate dimension (an
    expert MLP is a sum over that dimension): chunk c's W1/W3 rows and W2 columns of all experts are made,
    used and freed before chunk c+1, so at most one chunk of dense weights exists at a time; on a GPU with
    triton each chunk is made in one launch (`finetune.moe.dequant_kernel`), not one call per expert;
  - base and LoRA products are `torch._grouped_mm` calls over the per-expert stacks, LoRA added to the
    base output of the same chunk (w1 and w3 LoRA as one block-diagonal product);
  - a custom autograd Function saves the layer's inputs, the rank-r LoRA intermediates and the gate/up
    pre-activations, never a dense weight: backward dequantizes each chunk again.
The base weights are frozen: backward computes input and LoRA gradients only.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dequant_kernel import strided_dequantizer
from .quantized_experts import BLOCKSIZE, ExpertLoraDelta, QuantizedExperts

# Chunks of the intermediate dimension per layer call. Measured on an H100 (8x7B, seq 4096): 1 chunk 3,526 tok/s,
# 29.0 GiB peak; 2 chunks 3,318 tok/s, 27.8 GiB; 4 chunks 3,116 tok/s, 27.2 GiB.
DEFAULT_CHUNKS = 2
_LORA_PARAMS = ("w1", "w3", "w2")
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
    elif device.type != "cpu":
        return f"device {device.type} is not supported"
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
    return F.silu(h[:, :inter]) * h[:, inter:]


def _swiglu_backward_prepare(h: torch.Tensor, inter: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The activation again (the w2 LoRA gradient needs it) and, on CUDA, the buffer for dh."""
    if h.is_cuda and _triton_swiglu_backward() is not None:
        return _swiglu(h, inter), torch.empty_like(h)
    return _swiglu(h, inter), None


def _swiglu_backward(h: torch.Tensor, d_act: torch.Tensor, inter: int, out: torch.Tensor | None) -> torch.Tensor:
    """d[gate | up] from d(silu(gate) * up), computed in fp32, returned in h's dtype."""
    if out is not None:
        _triton_swiglu_backward()(h, d_act, out, inter)
        return out
    # without triton: blocks of rows, so the fp32 temporaries stay small and only `out` is layer-sized (as with
    # the fused kernel; whole-tensor fp32 temporaries were 10x the size of `out` at the real widths)
    out = torch.empty_like(h)
    block = max(1, _SWIGLU_BLOCK_ELEMENTS // inter)
    for start in range(0, h.shape[0], block):
        rows = slice(start, start + block)
        gate, up, d = h[rows, :inter].float(), h[rows, inter:].float(), d_act[rows].float()
        sig = torch.sigmoid(gate)
        out[rows, :inter] = d * up * sig * (1 + gate * (1 - sig))
        out[rows, inter:] = d * gate * sig
    return out


@functools.cache
def _triton_swiglu_backward():
    """One fused pass over [gate | up] and d_act (eager torch makes ~10 fp32 temporaries); None without triton."""
    return make_triton_swiglu_backward()


def make_triton_swiglu_backward():
    """A new launcher of that pass; with TRITON_INTERPRET=1 in the environment, one that runs on CPU tensors."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(h_ptr, d_ptr, out_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        h_row = h_ptr + row * 2 * inter
        gate = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
        sig = 1 / (1 + tl.exp(-gate))  # tl.sigmoid, written out: the interpreter cannot call library jit functions
        out_row = out_ptr + row * 2 * inter
        tl.store(out_row + cols, (d * up * sig * (1 + gate * (1 - sig))).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_row + inter + cols, (d * gate * sig).to(out_ptr.dtype.element_ty), mask=mask)

    def launch(h: torch.Tensor, d_act: torch.Tensor, out: torch.Tensor, inter: int) -> None:
        block = 1024
        kernel[(h.shape[0], triton.cdiv(inter, block))](h, d_act.contiguous(), out, inter, BLOCK=block)

    return launch


def _block_diag_b(b1: torch.Tensor, b3: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """[E, 2r, 2c]: B1[:, rows]^T top left, B3[:, rows]^T bottom right (one product serves w1 and w3)."""
    num_experts, _, r = b1.shape
    c = rows.stop - rows.start
    out = b1.new_zeros(num_experts, 2 * r, 2 * c, dtype=dtype)
    out[:, :r, :c] = b1[:, rows].transpose(1, 2)
    out[:, r:, c:] = b3[:, rows].transpose(1, 2)
    return out


def _strided_dequantizer(experts: QuantizedExperts):
    """The one-launch dequantizer of `finetune.moe.dequant_kernel` on a GPU with triton (unless the experts' switch
    is off), else None."""
    return strided_dequantizer() if experts.strided_dequant and experts.gate_up_proj.data.is_cuda else None


def _dequantize_gate_up(experts: QuantizedExperts, scales, chunk: int, chunks: int, dtype,
                        strided=None) -> torch.Tensor:
    """[E, 2c, H]: chunk `chunk` of the w1 rows, then the same chunk of the w3 rows, of every expert.
    `strided`: a launcher from `finetune.moe.dequant_kernel` (one launch, instead of one call per expert and row
    group)."""
    stack, inter, hidden = experts.gate_up_proj, experts.intermediate_dim, experts.hidden_dim
    num_experts = experts.num_experts
    if chunks == 1:  # the whole stack: one contiguous run, one call
        return stack.dequantize_part(scales, (1,), (0,), stack.shape, dtype)
    c = inter // chunks
    if strided is not None:
        out = torch.empty(num_experts, 2, c, hidden, dtype=dtype, device=stack.data.device)
        strided(stack.data, scales, stack.code, out, chunk * c * hidden, (2 * inter * hidden, inter * hidden, hidden),
                BLOCKSIZE)
        return out.view(num_experts, 2 * c, hidden)
    return stack.dequantize_rows(scales, slice(chunk * c, (chunk + 1) * c), dtype, groups=2)


def _dequantize_down(experts: QuantizedExperts, scales, chunk: int, chunks: int, dtype, strided=None) -> torch.Tensor:
    """[E, H, c]: columns chunk*c .. (chunk+1)*c of every expert's w2 (`strided`: as for `_dequantize_gate_up`,
    reading the columns where they lie instead of from a gathered copy of their packed bytes)."""
    stack, inter, hidden = experts.down_proj, experts.intermediate_dim, experts.hidden_dim
    num_experts, c = experts.num_experts, inter // chunks
    if strided is not None and chunks > 1:
        out = torch.empty(num_experts, 1, hidden, c, dtype=dtype, device=stack.data.device)
        strided(stack.data, scales, stack.code, out, chunk * c, (hidden * inter, 0, inter), BLOCKSIZE)
        return out.view(num_experts, hidden, c)
    return stack.dequantize_part(scales, (hidden, chunks), (slice(None), chunk), (num_experts, hidden, c), dtype)


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
        strided = _strided_dequantizer(experts)

        # rank-r LoRA inputs: [x A1^T | x A3^T] per adapter
        xa = [_gmm(a["x"] if a["x"] is not None else x, torch.cat([a["A"]["w1"], a["A"]["w3"]], 1).to(dt).transpose(1, 2), offs)
              for a in adapters]
        aa2 = [None] * len(adapters)
        hidden, masks, y = [], [], None
        for c in range(chunks):
            rows = slice(c * inter, (c + 1) * inter)
            w13 = _dequantize_gate_up(experts, gate_up_scales, c, chunks, dt, strided)
            h = _gmm(x, w13.transpose(1, 2), offs)
            del w13
            for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
                h.add_(_gmm(xa[j], _block_diag_b(a["B"]["w1"], a["B"]["w3"], rows, dt), offs), alpha=spec.scaling)
            hidden.append(h)
            act = _swiglu(h, inter)
            for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
                lora_in = act
                if spec.dropout:
                    keep = torch.rand_like(act, dtype=torch.float32) >= spec.dropout
                    masks.append(keep)
                    lora_in = act * keep / (1 - spec.dropout)
                part = _gmm(lora_in, a["A"]["w2"][:, :, rows].to(dt).contiguous().transpose(1, 2), offs).float()
                aa2[j] = part if aa2[j] is None else aa2[j].add_(part)
            w2 = _dequantize_down(experts, down_scales, c, chunks, dt, strided)
            part = _gmm(act, w2.transpose(1, 2), offs)
            del w2, act
            y = part if y is None else y.add_(part)  # bf16 sum of the chunks' partial products
        aa2 = [t.to(dt) for t in aa2]
        for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
            y = y.add_(_gmm(aa2[j], a["B"]["w2"].to(dt).transpose(1, 2), offs), alpha=spec.scaling)

        ctx.plan = plan
        ctx.save_for_backward(x, offs, *(t for t in tensors), *xa, *aa2, *hidden, *masks)
        return y.to(dt)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        plan = ctx.plan
        experts, chunks, dt = plan.experts, plan.chunks, plan.dtype
        inter = experts.intermediate_dim // chunks
        n = len(plan.adapters)
        saved = list(ctx.saved_tensors)
        x, offs = saved[0], saved[1]
        tensors, rest = saved[2 : 2 + 7 * n], saved[2 + 7 * n :]
        xa, aa2, hidden, masks = rest[:n], rest[n : 2 * n], rest[2 * n : 2 * n + chunks], rest[2 * n + chunks :]
        adapters = _adapter_tensors(plan, tensors)
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
        gate_up_scales, down_scales = experts.gate_up_proj.block_scales(), experts.down_proj.block_scales()
        strided = _strided_dequantizer(experts)
        dy = dy.to(dt).contiguous()

        grads = [{"x": None, "A": {}, "B": {}} for _ in adapters]
        daa2, dxa, parts = [], [], [{"A2": [], "B1": [], "B3": []} for _ in adapters]
        for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
            grads[j]["B"]["w2"] = _gmm_weight_grad(dy, aa2[j], offs, empty).mul_(spec.scaling)
            daa2.append(_gmm(dy, a["B"]["w2"].to(dt), offs).mul_(spec.scaling))
            dxa.append(None)
        dx, mask_iter = None, iter(masks)
        for c in range(chunks):
            rows = slice(c * inter, (c + 1) * inter)
            w2 = _dequantize_down(experts, down_scales, c, chunks, dt, strided)
            d_act = _gmm(dy, w2, offs)
            del w2
            act, dh = _swiglu_backward_prepare(hidden[c], inter)
            for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
                lora_in, keep = act, None
                if spec.dropout:
                    keep = next(mask_iter)
                    lora_in = act * keep / (1 - spec.dropout)
                parts[j]["A2"].append(_gmm_weight_grad(daa2[j], lora_in, offs, empty))
                d_in = _gmm(daa2[j], a["A"]["w2"][:, :, rows].to(dt).contiguous(), offs)
                d_act.add_(d_in if keep is None else d_in * keep / (1 - spec.dropout))
            dh = _swiglu_backward(hidden[c], d_act, inter, dh)
            del d_act, act
            w13 = _dequantize_gate_up(experts, gate_up_scales, c, chunks, dt, strided)
            part = _gmm(dh, w13, offs)
            del w13
            dx = part if dx is None else dx.add_(part)
            for j, (a, spec) in enumerate(zip(adapters, plan.adapters)):
                db = _gmm_weight_grad(dh, xa[j], offs, empty).mul_(spec.scaling)  # [E, 2c, 2r]
                r = db.shape[2] // 2
                parts[j]["B1"].append(db[:, :inter, :r])
                parts[j]["B3"].append(db[:, inter:, r:])
                bd = _block_diag_b(a["B"]["w1"], a["B"]["w3"], rows, dt)
                d = _gmm(dh, bd.transpose(1, 2), offs).float().mul_(spec.scaling)
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
