"""Adapters on disk in the ORIGINAL per-expert naming, loadable by stock peft on a stock bf16 Mixtral.

  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight                 [r, H]
  base_model.model.model.layers.N.block_sparse_moe.experts.E.w1.lora_A.weight    [r, H]   (w3 alike)
  base_model.model.model.layers.N.block_sparse_moe.experts.E.w1.lora_B.weight    [I, r]
  base_model.model.model.layers.N.block_sparse_moe.experts.E.w2.lora_A.weight    [r, I]
  base_model.model.model.layers.N.mlp.gate.weight                                [E, H]   (router="full" only)

adapter_config.json: r / lora_alpha are the EXPERT values and attention gets rank_pattern / alpha_pattern,
because stock peft fuses w1+w3 into gate_up_proj with rank 2*r and alpha 2*lora_alpha taken from the global
r / lora_alpha (it ignores patterns there). rsLoRA is written as plain LoRA with an alpha giving the same
scaling, because the fused rank 2r would change an rsLoRA scaling.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .expert_lora import EXPERT_PROJECTIONS, ExpertLoraLayer
from .lora_config import ATTENTION_MODULES, EXPERTS_MODULE, ROUTER_MODULE, register_expert_lora

WEIGHTS_NAME = "adapter_model.safetensors"


def _export_views(peft_model: nn.Module, adapter: str, whole=None) -> dict[str, torch.Tensor]:
    """Export key -> the live tensor (or per-expert slice) holding it, for every parameter of `adapter`;
    `whole` maps a parameter to the tensor to cut (the gathered whole of a sharded one)."""
    views: dict[str, torch.Tensor] = {}
    tag = f".{adapter}."
    for name, p in peft_model.named_parameters():
        if tag not in name:
            continue
        if whole is not None:
            p = whole(p)
        if m := re.fullmatch(rf"(.*)\.mlp\.experts\.(lora_[AB])\.{re.escape(adapter)}\.(w[123])", name):
            for e in range(p.shape[0]):
                views[f"{m[1]}.block_sparse_moe.experts.{e}.{m[3]}.{m[2]}.weight"] = p[e]
        elif m := re.fullmatch(rf"(.*\.self_attn\.[qkvo]_proj\.lora_[AB])\.{re.escape(adapter)}\.weight", name):
            views[f"{m[1]}.weight"] = p
        elif m := re.fullmatch(rf"(.*\.mlp\.gate)\.modules_to_save\.{re.escape(adapter)}\.weight", name):
            views[f"{m[1]}.weight"] = p
        else:
            raise ValueError(f"adapter parameter {name} has no export name (unsupported target)")
    if not views:
        raise ValueError(f"the model has no parameters for adapter {adapter!r}")
    return views


def _group_scaling(peft_model: nn.Module, adapter: str, experts: bool) -> tuple[int, float] | None:
    """(rank, alpha for plain-LoRA scaling alpha/r) shared by every expert layer, or every attention layer."""
    found = set()
    for module in peft_model.modules():
        is_expert = isinstance(module, ExpertLoraLayer)
        if is_expert == experts and hasattr(module, "scaling") and adapter in getattr(module, "r", {}):
            r = module.r[adapter]
            found.add((r, module.scaling[adapter] * r))
    if len(found) > 1:
        raise ValueError(f"{'expert' if experts else 'attention'} layers use different ranks/scalings {found}: "
                         "the per-expert export supports one value per group")
    return found.pop() if found else None


def export_config(peft_model: nn.Module, adapter: str):
    """The adapter_config stock peft needs (see the module docstring for why r/alpha are the expert values)."""
    from peft import LoraConfig

    source = peft_model.peft_config[adapter]
    attention = _group_scaling(peft_model, adapter, experts=False)
    experts = _group_scaling(peft_model, adapter, experts=True)
    attn_names = sorted(t for t in source.target_modules if t in ATTENTION_MODULES)
    r, alpha = experts or attention or (source.r, source.lora_alpha)
    patterns = {n: attention for n in attn_names} if attention and experts else {}
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=source.lora_dropout,
        target_modules=attn_names + (list(EXPERT_PROJECTIONS) if experts else []),
        rank_pattern={n: ra[0] for n, ra in patterns.items()},
        alpha_pattern={n: ra[1] for n, ra in patterns.items()},
        modules_to_save=[ROUTER_MODULE] if source.modules_to_save else None,
        use_rslora=False,
        task_type="CAUSAL_LM",
        base_model_name_or_path=source.base_model_name_or_path,
    )


def save_adapter(peft_model: nn.Module, out_dir: str | Path, adapter_name: str = "default",
                 write: bool = True) -> Path:
    """Write adapter_model.safetensors + adapter_config.json in the per-expert naming.

    A model sharded over processes (FSDP2, ZeRO-3) is gathered first, by every process in the same order; only the
    process given `write` writes."""
    from safetensors.torch import save_file

    from finetune.distributed import whole

    out = Path(out_dir)
    views = _export_views(peft_model, adapter_name, whole=whole)
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in views.items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    export_config(peft_model, adapter_name).save_pretrained(str(out))
    return out


def _training_config(exported):
    """Our LoraConfig (experts through ExpertLoraLayer) equivalent to an exported per-expert config."""
    from peft import LoraConfig

    targets = set(exported.target_modules or ())
    attn = sorted(targets & set(ATTENTION_MODULES))
    has_experts = bool(targets & set(EXPERT_PROJECTIONS))
    if has_experts and not targets >= set(EXPERT_PROJECTIONS):
        raise ValueError(f"adapter targets {sorted(targets)}: expert LoRA needs all of w1, w2, w3")
    unknown = targets - set(ATTENTION_MODULES) - set(EXPERT_PROJECTIONS)
    if unknown:
        raise ValueError(f"adapter targets modules this loader does not know: {sorted(unknown)}")
    config = LoraConfig(
        r=exported.r,
        lora_alpha=exported.lora_alpha,
        lora_dropout=exported.lora_dropout,
        target_modules=attn + ([EXPERTS_MODULE] if has_experts else []),
        rank_pattern={k: v for k, v in exported.rank_pattern.items() if k in ATTENTION_MODULES},
        alpha_pattern={k: v for k, v in exported.alpha_pattern.items() if k in ATTENTION_MODULES},
        modules_to_save=[ROUTER_MODULE] if exported.modules_to_save else None,
        use_rslora=exported.use_rslora,
        task_type="CAUSAL_LM",
        base_model_name_or_path=exported.base_model_name_or_path,
    )
    return register_expert_lora(config)


def load_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default", is_trainable: bool = True):
    """Load a per-expert adapter folder into our (quantized or stock-layout) model; returns the PeftModel.

    A PeftModel gets the adapter added beside its others (active adapter unchanged); a plain model is wrapped.
    Every tensor in the file must fill exactly one adapter parameter and vice versa.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = _training_config(LoraConfig.from_pretrained(str(adapter_dir)))
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
    views = _export_views(peft_model, adapter_name)
    missing, unexpected = sorted(set(views) - set(tensors)), sorted(set(tensors) - set(views))
    if missing or unexpected:
        raise ValueError(f"{adapter_dir}: missing {len(missing)} tensors {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}")
    with torch.no_grad():
        for key, view in views.items():
            if view.shape != tensors[key].shape:
                raise ValueError(f"{key}: file shape {tuple(tensors[key].shape)} != model shape {tuple(view.shape)}")
            view.copy_(tensors[key])
    if not is_trainable:
        for name, p in peft_model.named_parameters():
            if f".{adapter_name}." in name:
                p.requires_grad_(False)
    return peft_model
