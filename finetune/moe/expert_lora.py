"""A peft LoRA layer for Mixtral experts: a separate A and B per expert for w1, w3 and w2, stacked.

Registered through peft's custom-module API for both `QuantizedExperts` and transformers' `MixtralExperts`,
so peft owns it: several named adapters, `set_adapter`, `disable_adapter`, requires_grad bookkeeping, and
parameter names `...experts.lora_A.<adapter>.w1` (the adapter name sits between dots, which trl's
reference-adapter copy relies on).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .quantized_experts import ExpertLoraDelta, expert_forward, expert_weights_of

EXPERT_PROJECTIONS = ("w1", "w3", "w2")


def _lora_shapes(num_experts: int, hidden: int, inter: int, r: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(A shape, B shape) per projection: w1, w3 map H -> I, w2 maps I -> H."""
    return {
        "w1": ((num_experts, r, hidden), (num_experts, inter, r)),
        "w3": ((num_experts, r, hidden), (num_experts, inter, r)),
        "w2": ((num_experts, r, inter), (num_experts, hidden, r)),
    }


def _init_stack(a: torch.Tensor, b: torch.Tensor, init: bool | str) -> None:
    """peft's conventions, per expert slice (a 3-D tensor's fan-in would otherwise count the expert axis)."""
    with torch.no_grad():
        for e in range(a.shape[0]):
            if init is True or init is False:
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(a[e], std=1 / a.shape[1])
            else:
                raise ValueError(f"init_lora_weights={init!r} is not supported for expert LoRA (use True, False, 'gaussian')")
            if init is False:  # peft: False means a random B too (tests use it to get a non-trivial adapter)
                nn.init.kaiming_uniform_(b[e], a=math.sqrt(5))
            else:
                b[e].zero_()


class ExpertLoraLayer(nn.Module, LoraLayer):
    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int, lora_alpha: int, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.hidden_dim, module.hidden_dim

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        if r <= 0:
            raise ValueError(f"expert LoRA rank must be positive, got {r}")
        if config.use_dora or config.lora_bias:
            raise ValueError("expert LoRA supports plain LoRA only (no DoRA, no lora_bias)")
        base = self.get_base_layer()
        device = next(base.parameters()).device
        shapes = _lora_shapes(base.num_experts, base.hidden_dim, base.intermediate_dim, r)
        a = {p: torch.empty(sa, device=device, dtype=torch.float32) for p, (sa, _) in shapes.items()}
        b = {p: torch.empty(sb, device=device, dtype=torch.float32) for p, (_, sb) in shapes.items()}
        for p in EXPERT_PROJECTIONS:
            _init_stack(a[p], b[p], config.init_lora_weights)
        self.lora_A[adapter_name] = nn.ParameterDict({p: nn.Parameter(t) for p, t in a.items()})
        self.lora_B[adapter_name] = nn.ParameterDict({p: nn.Parameter(t) for p, t in b.items()})
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = config.use_rslora
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        p_drop = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p_drop) if p_drop > 0 else nn.Identity()
        self.set_adapter(self.active_adapters)

    def deltas(self) -> list[ExpertLoraDelta]:
        return [
            ExpertLoraDelta(dict(self.lora_A[n]), dict(self.lora_B[n]), self.scaling[n], self.lora_dropout[n])
            for n in self.active_adapters
            if n in self.lora_A
        ]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        weights = expert_weights_of(self.get_base_layer())
        return expert_forward(hidden_states, top_k_index, top_k_weights, weights, self.deltas())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "expert LoRA is not merged into the training model (4-bit weights would be re-quantized, lossy); "
            "export with finetune.moe.save_adapter and merge into the bf16 base with stock peft"
        )

    def unmerge(self) -> None:
        """Nothing is ever merged (see `merge`)."""

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def set_expert_dropout(model: nn.Module, p: float, adapter_name: str = "default") -> int:
    """Give the expert adapters their own dropout (peft has one lora_dropout per config); returns layers changed."""
    layers = [m for m in model.modules() if isinstance(m, ExpertLoraLayer) and adapter_name in m.lora_dropout]
    for layer in layers:
        layer.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
    return len(layers)
