"""Mixtral in 4-bit with the experts quantized, LoRA on attention and on every expert, adapters in per-expert naming.

Public API (imports torch, peft and transformers: import this package lazily from CLIs):
  load_mixtral, LoadReport, trainable_report, build_lora_config, save_adapter, load_adapter,
  QuantizedExperts, expert_forward, ExpertLoraLayer, set_expert_dropout, dequantized_state_dict, build_tiny_mixtral.
"""
from .adapter_io import load_adapter, save_adapter
from .dequantize import dequantized_state_dict
from .expert_lora import ExpertLoraLayer, set_expert_dropout
from .loader import load_mixtral
from .lora_config import build_lora_config
from .quantized_experts import ExpertLoraDelta, QuantizedExperts, expert_forward
from .report import LoadReport, TrainableReport, trainable_report
from .tiny import build_tiny_mixtral

__all__ = [
    "ExpertLoraDelta", "ExpertLoraLayer", "LoadReport", "QuantizedExperts", "TrainableReport", "build_lora_config",
    "build_tiny_mixtral", "dequantized_state_dict", "expert_forward", "load_adapter", "load_mixtral", "save_adapter",
    "set_expert_dropout", "trainable_report",
]
