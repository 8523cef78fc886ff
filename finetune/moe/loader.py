"""Stream a Mixtral safetensors checkpoint into a model whose attention and experts are 4-bit.

The model is built on the meta device; each tensor is read alone (`safe_open`) and placed; a layer's
expert stack is quantized as soon as its 3*E expert tensors have been read. So neither host nor device
holds the model in bf16: the peak is about the quantized model plus one layer's experts in bf16.
"""
from __future__ import annotations

import json
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..rmsnorm import use_lean_rms_norms
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
    progress: tqdm  # one step per layer whose experts are in place: the bulk of the reading and quantizing
    ledger: _Ledger = field(default_factory=_Ledger)
    pending: dict[int, _ExpertStacks] = field(default_factory=dict)
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


@dataclass
class _ExpertStacks:
    """One layer's expert stacks on the target device, filled in place as the checkpoint's tensors arrive.

    Copying each tensor into its slot (rather than stacking once all have arrived) keeps one bf16 copy of a
    layer's experts alive at a time: the load peak is the quantized model plus one layer.
    """

    gate_up: torch.Tensor  # [E, 2I, H]: w1 rows, then w3 rows
    down: torch.Tensor  # [E, H, I]
    received: set[tuple[int, str]] = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        return (self.gate_up.numel() + self.down.numel()) * self.gate_up.element_size()


def _stacks(state: _Loading, layer: int, dtype: torch.dtype) -> _ExpertStacks:
    if layer not in state.pending:
        config = state.model.config
        experts, inter, hidden = config.num_local_experts, config.intermediate_size, config.hidden_size
        state.pending[layer] = _ExpertStacks(
            torch.empty(experts, 2 * inter, hidden, device=state.device, dtype=dtype),
            torch.empty(experts, hidden, inter, device=state.device, dtype=dtype),
        )
        state.ledger.add(state.pending[layer].nbytes)
    return state.pending[layer]


def _slot(stacks: _ExpertStacks, expert: int, proj: str) -> torch.Tensor:
    inter = stacks.down.shape[2]
    if proj == "w1":
        return stacks.gate_up[expert, :inter]
    if proj == "w3":
        return stacks.gate_up[expert, inter:]
    if proj == "w2":
        return stacks.down[expert]
    return stacks.gate_up if proj == "gate_up_proj" else stacks.down


def _take_expert_tensor(state: _Loading, key: str, layer: int, expert: int, proj: str, tensor: torch.Tensor) -> None:
    """Copy one expert tensor (or a fused stack, expert -1) into the layer's stacks; install once complete."""
    stacks = _stacks(state, layer, tensor.dtype)
    slot = _slot(stacks, expert, proj)
    if tuple(tensor.shape) != tuple(slot.shape):
        raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(slot.shape)}")
    if (expert, proj) in stacks.received:
        raise ValueError(f"{key}: appears twice in the checkpoint")
    slot.copy_(tensor)
    stacks.received.add((expert, proj))
    complete = 2 if expert < 0 else 3 * state.model.config.num_local_experts
    if len(stacks.received) == complete:
        del state.pending[layer]
        _install_experts(state, layer, stacks.gate_up, stacks.down)
        state.ledger.held -= stacks.nbytes
        state.progress.update()


def _install_experts(state: _Loading, layer: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    from .quantized_experts import QuantizedExperts

    mlp = state.model.model.layers[layer].mlp
    prefix = f"model.layers.{layer}.mlp.experts"
    if state.quant is None:
        _set_parameter(state, f"{prefix}.gate_up_proj", gate_up)
        _set_parameter(state, f"{prefix}.down_proj", down)
        return
    mlp.experts = QuantizedExperts(gate_up, down, act_fn=mlp.experts.act_fn, quant_type=state.quant,
                                   double_quant=state.double_quant, compute_dtype=state.compute_dtype)
    state.ledger.add(mlp.experts.nbytes())
    state.loaded.update({f"{prefix}.gate_up_proj", f"{prefix}.down_proj"})


def _take(state: _Loading, key: str, tensor: torch.Tensor) -> None:
    if m := EXPERT_WEIGHT.match(key):
        _take_expert_tensor(state, key, int(m[1]), int(m[2]), m[3], tensor)
    elif m := FUSED_EXPERTS.match(key):  # a checkpoint already in transformers-5 layout
        _take_expert_tensor(state, key, int(m[1]), -1, m[2], tensor)
    elif state.quant is not None and ATTENTION_WEIGHT.match(key):
        _install_linear4bit(state, key, tensor)
    else:
        _set_parameter(state, key.replace(".block_sparse_moe.gate.", ".mlp.gate."), tensor)


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
    from transformers import MixtralConfig

    path = Path(path)
    return load_mixtral_tensors(MixtralConfig.from_pretrained(path), _checkpoint_tensors(path), quant=quant,
                                double_quant=double_quant, compute_dtype=compute_dtype, device=device)


def load_mixtral_tensors(
    config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    quant: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> tuple[nn.Module, LoadReport]:
    """As load_mixtral, from any stream of (checkpoint name, tensor): a checkpoint, or weights made on the fly."""
    from transformers import MixtralForCausalLM

    if quant not in ("nf4", "fp4", None):
        raise ValueError(f"quant must be 'nf4', 'fp4' or None, got {quant!r}")
    dev = torch.device(device)
    config.dtype = compute_dtype
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    rss_before = _max_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    desc = f"[model] loading, quantizing to {quant}" if quant else "[model] loading"
    from finetune.distributed import is_main

    # one bar for the run, not one per process; `disable` is passed only to silence the others, since an explicit
    # value would override TQDM_DISABLE
    quiet = {} if is_main() else {"disable": True}
    with tqdm(total=config.num_hidden_layers, desc=desc, unit="layer", **quiet) as progress:
        state = _Loading(model, quant, double_quant, compute_dtype, dev, progress)
        for key, tensor in tensors:
            _take(state, key, tensor)
        _finish(state)
    use_lean_rms_norms(model)
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
