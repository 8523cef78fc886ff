"""One LoraConfig for Mixtral: attention q/k/v/o through peft's own layers, experts through `ExpertLoraLayer`."""
from __future__ import annotations

from typing import Literal

from peft import LoraConfig

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Not "w1/w2/w3" and not "gate": peft 0.21 rewrites those names for model_type mixtral to the fused parameters.
EXPERTS_MODULE = "experts"
ROUTER_MODULE = "mlp.gate"
EXPERTS_PATTERN = r"mlp\.experts"
RouterMode = Literal["frozen", "full"]


def register_expert_lora(config: LoraConfig) -> LoraConfig:
    """Map both expert containers (4-bit and stock) to our LoRA layer; returns the same config."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from .expert_lora import ExpertLoraLayer
    from .quantized_experts import QuantizedExperts

    config._register_custom_module({QuantizedExperts: ExpertLoraLayer, MixtralExperts: ExpertLoraLayer})
    return config


def build_lora_config(
    r: int,
    alpha: int,
    dropout: float,
    attention: bool = True,
    experts: bool = True,
    router: str = "frozen",
    expert_r: int | None = None,
    expert_alpha: int | None = None,
    use_rslora: bool = False,
) -> LoraConfig:
    """LoRA on attention (r, alpha) and on every expert's w1/w2/w3 (expert_r, expert_alpha; default r, alpha).

    router: "frozen" (not trained) or "full" (the [E, H] router weight trained in full and saved with the
    adapter). "lora" is refused: the router has E*H weights, fewer than a rank-r LoRA's r*(E+H) for any r >= E.
    """
    problems = []
    if router == "lora":
        problems.append("router='lora' is not offered: a LoRA on the [E, H] router has more parameters than the "
                        "router itself (r*(E+H) vs E*H); use router='full'")
    elif router not in ("frozen", "full"):
        problems.append(f"router must be 'frozen' or 'full', got {router!r}")
    if not (attention or experts):
        problems.append("enable attention or experts (peft needs at least one LoRA target)")
    for name, value in (("r", r), ("expert_r", expert_r)):
        if value is not None and value <= 0:
            problems.append(f"{name} must be positive, got {value}")
    if not 0 <= dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {dropout}")
    if problems:
        raise ValueError("; ".join(problems))

    targets = [*ATTENTION_MODULES] if attention else []
    rank_pattern, alpha_pattern = {}, {}
    if experts:
        targets.append(EXPERTS_MODULE)
        rank_pattern[EXPERTS_PATTERN] = expert_r if expert_r is not None else r
        alpha_pattern[EXPERTS_PATTERN] = expert_alpha if expert_alpha is not None else alpha
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=[ROUTER_MODULE] if router == "full" else None,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    return register_expert_lora(config)
