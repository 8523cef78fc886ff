"""Dense weights of a quantized model, in the stock transformers-5 layout: for tests and bf16 export checks."""
from __future__ import annotations

import torch
from torch import nn

from .quantized_experts import QuantizedExperts


def _dense_linear4bit(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    data, qs = module.weight.data, module.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):  # bnb repacks for CPU inference kernels; undo on a copy
        data, qs = _convert_weight_packed_for_cpu_inverse(data.clone(), qs)
    return bnbf.dequantize_4bit(data, qs).to(dtype)


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """State dict of the stock MixtralForCausalLM equal to what the quantized `model` computes with."""
    import bitsandbytes as bnb

    packed = {id(p) for m in model.modules() if isinstance(m, QuantizedExperts) for p in m.parameters()}
    out = {n: p.detach().to(dtype) for n, p in model.named_parameters()
           if not isinstance(p, bnb.nn.Params4bit) and id(p) not in packed}
    if getattr(model.config, "tie_word_embeddings", False):
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[f"{name}.weight"] = _dense_linear4bit(module, dtype)
        elif isinstance(module, QuantizedExperts):
            out[f"{name}.gate_up_proj"] = module.gate_up_proj.dequantize(dtype)
            out[f"{name}.down_proj"] = module.down_proj.dequantize(dtype)
    return out
