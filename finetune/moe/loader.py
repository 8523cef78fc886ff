"""Stream a Mixtral safetensors checkpoint into a model whose attention and experts are 4-bit.

The model is built on the meta device; each tensor is read alone (`safe_open`) and placed; a layer's
expert stack is quantized as soon as its 3*E expert tensors have been read. So neither host nor device
holds the model in bf16: the peak is about the quantized model plus one layer's experts in bf16.
"""
from __future__ import annotations

import json
import re
import resource
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .report import LoadReport, measure_parts

ATTENTION_WEIGHT = re.compile(r"^model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight$")
EXPERT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time, shard by shard (the index decides the shards)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for shard in shards:
        with safe_open(str(path / shard), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


@dataclass
class _Ledger:
    """Bytes the loader holds in tensors it created: an honest, allocator-independent peak on CPU."""

    held: int = 0
    peak: int = 0

    def add(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)


@dataclass
class _Loading:
    model: nn.Module
    quant: str | None
    double_quant: bool
    compute_dtype: torch.dtype
    device: torch.device
    ledger: _Ledger = field(default_factory=_Ledger)
    pending: dict[int, dict[tuple[int, str], torch.Tensor]] = field(default_factory=lambda: defaultdict(dict))
    loaded: set[str] = field(default_factory=set)


def _set_parameter(state: _Loading, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = state.model.get_submodule(module_name)
    if leaf not in module._parameters:
        raise KeyError(f"checkpoint tensor {name} has no parameter in the model")
    expected = module._parameters[leaf].shape
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected)}")
    value = tensor.to(state.device, state.compute_dtype)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())
    state.ledger.add(value.numel() * value.element_size())
    state.loaded.add(name)


def _install_linear4bit(state: _Loading, name: str, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    module_name = name.removesuffix(".weight")
    parent_name, _, child = module_name.rpartition(".")
    old = state.model.get_submodule(module_name)
    if tuple(weight.shape) != (old.out_features, old.in_features):
        raise ValueError(f"{name}: checkpoint shape {tuple(weight.shape)} != model shape {(old.out_features, old.in_features)}")
    new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=state.compute_dtype,
                            compress_statistics=state.double_quant, quant_type=state.quant, device="meta")
    param = bnb.nn.Params4bit(weight.to(state.compute_dtype), requires_grad=False, blocksize=64,
                              compress_statistics=state.double_quant, quant_type=state.quant, module=new)
    new.weight = param._quantize(state.device)  # explicit: a CPU->CPU `.to()` would leave it unquantized
    # bnb otherwise repacks the weight in place at the first CPU eval forward and computes in bf16 from then
    # on, whatever compute_dtype says; keep one format and the stated compute dtype (no effect on GPU).
    new.support_avx512bf16_for_cpu = False
    setattr(state.model.get_submodule(parent_name), child, new)
    state.ledger.add(new.weight.numel() + _quant_state_bytes(new.weight.quant_state))
    state.loaded.add(name)


def _quant_state_bytes(qs) -> int:
    tensors = [qs.absmax, qs.code, qs.offset]
    if qs.state2 is not None:
        tensors += [qs.state2.absmax, qs.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _install_experts(state: _Loading, layer: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    from .quantized_experts import QuantizedExperts

    mlp = state.model.model.layers[layer].mlp
    old = mlp.experts
    expected_gu, expected_dn = tuple(old.gate_up_proj.shape), tuple(old.down_proj.shape)
    if tuple(gate_up.shape) != expected_gu or tuple(down.shape) != expected_dn:
        raise ValueError(f"layer {layer} experts: shapes {tuple(gate_up.shape)}, {tuple(down.shape)} != {expected_gu}, {expected_dn}")
    gate_up = gate_up.to(state.device, state.compute_dtype)
    down = down.to(state.device, state.compute_dtype)
    prefix = f"model.layers.{layer}.mlp.experts"
    if state.quant is None:
        _set_parameter(state, f"{prefix}.gate_up_proj", gate_up)
        _set_parameter(state, f"{prefix}.down_proj", down)
        return
    stacked = gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
    state.ledger.add(stacked)
    mlp.experts = QuantizedExperts(gate_up, down, act_fn=old.act_fn, quant_type=state.quant,
                                   double_quant=state.double_quant, compute_dtype=state.compute_dtype)
    state.ledger.add(mlp.experts.nbytes())
    state.ledger.held -= stacked
    state.loaded.update({f"{prefix}.gate_up_proj", f"{prefix}.down_proj"})


def _take_expert_tensor(state: _Loading, layer: int, expert: int, proj: str, tensor: torch.Tensor) -> None:
    """Buffer one expert tensor; once the layer's 3*E are in, stack them (w1 rows then w3 rows) and install."""
    pending = state.pending[layer]
    pending[(expert, proj)] = tensor
    state.ledger.add(tensor.numel() * tensor.element_size())
    num_experts = state.model.config.num_local_experts
    if len(pending) < 3 * num_experts:
        return
    held = sum(t.numel() * t.element_size() for t in pending.values())
    gate_up = torch.stack([torch.cat([pending[(e, "w1")], pending[(e, "w3")]]) for e in range(num_experts)])
    down = torch.stack([pending[(e, "w2")] for e in range(num_experts)])
    del state.pending[layer], pending
    state.ledger.add(held)  # the stacked copies, alive together with the read tensors for a moment
    state.ledger.held -= 2 * held
    _install_experts(state, layer, gate_up, down)


def _take(state: _Loading, key: str, tensor: torch.Tensor) -> None:
    if m := EXPERT_WEIGHT.match(key):
        _take_expert_tensor(state, int(m[1]), int(m[2]), m[3], tensor)
    elif m := FUSED_EXPERTS.match(key):  # a checkpoint already in transformers-5 layout
        _take_fused(state, int(m[1]), m[2], tensor)
    elif state.quant is not None and ATTENTION_WEIGHT.match(key):
        _install_linear4bit(state, key, tensor)
    else:
        _set_parameter(state, key.replace(".block_sparse_moe.gate.", ".mlp.gate."), tensor)


def _take_fused(state: _Loading, layer: int, which: str, tensor: torch.Tensor) -> None:
    pending = state.pending[layer]
    pending[(-1, which)] = tensor
    if len(pending) == 2:
        del state.pending[layer]
        _install_experts(state, layer, pending[(-1, "gate_up_proj")], pending[(-1, "down_proj")])


def _finish(state: _Loading) -> None:
    """Tie embeddings, rebuild the rotary buffers (created on meta), and refuse anything left unloaded."""
    model, config = state.model, state.model.config
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary_cls(config).to(state.device)
    if state.pending:
        raise ValueError(f"incomplete expert tensors for layers {sorted(state.pending)}")
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")


def load_mixtral(
    path: str | Path,
    *,
    quant: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> tuple[nn.Module, LoadReport]:
    """Load a Mixtral checkpoint: quant "nf4"/"fp4" (attention Linear4bit + QuantizedExperts) or None (stock layout)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if quant not in ("nf4", "fp4", None):
        raise ValueError(f"quant must be 'nf4', 'fp4' or None, got {quant!r}")
    path, dev = Path(path), torch.device(device)
    config = MixtralConfig.from_pretrained(path)
    config.dtype = compute_dtype
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    state = _Loading(model, quant, double_quant, compute_dtype, dev)
    rss_before = _max_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for key, tensor in _checkpoint_tensors(path):
        _take(state, key, tensor)
    _finish(state)
    model.eval()
    if quant is not None:
        model.is_loaded_in_4bit = True  # peft reads this to wrap Linear4bit with its 4-bit LoRA layer
    report = LoadReport(
        quant=quant,
        double_quant=double_quant if quant else False,
        compute_dtype=str(compute_dtype).removeprefix("torch."),
        device=str(dev),
        parts=measure_parts(model),
        peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else state.ledger.peak,
        peak_method="torch.cuda.max_memory_allocated" if dev.type == "cuda" else "loader ledger (bytes of tensors the loader held)",
        host_rss_growth_bytes=max(0, _max_rss_bytes() - rss_before),
    )
    return model, report


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
