"""Stream a Mixtral safetensors checkpoint into a model whose attention and experts are 4-bit.

The model is built on the meta device; each tensor is read alone (`safe_open`) and placed; a layer's
expert stack is quantized as soon as its 3*E expert tensors have been read. So neither host nor device
holds the model in bf16: the peak is about the quantized model plus one layer's experts in bf16.
"""
from __future__ import annotations

import json
import math
import os
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from ..errors import FinetuneError
from ..rmsnorm import use_lean_rms_norms
from .report import LoadReport, measure_parts

ATTENTION_WEIGHT = re.compile(r"^model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight$")
EXPERT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# buffers that older checkpoints carry and the model computes itself (transformers skips them too)
RECOMPUTED = re.compile(r"\.rotary_emb\.inv_freq$")
INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100_000_000  # safetensors refuses a longer header


class CheckpointKeyError(FinetuneError):
    """A checkpoint tensor the model cannot take, or one it needs and lacks; `key` is its checkpoint name."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


def mixtral_config(path: Path):
    """The folder's config.json as a MixtralConfig; any other model type is refused, not loaded as Mixtral
    (transformers would only warn, and fill what the file lacks with 8x7B's defaults)."""
    from transformers import MixtralConfig

    file = path / "config.json"
    if not file.is_file():
        raise FinetuneError(f"{path}: no config.json; a checkpoint folder holds config.json and its safetensors weights")
    try:
        model_type = json.loads(file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise FinetuneError(f"{file}: not a model config ({e})") from None
    if model_type != "mixtral":
        raise FinetuneError(f"{file}: model_type is {model_type!r}, not 'mixtral'; finetune trains Mixtral models only")
    return MixtralConfig.from_pretrained(path)


def weight_files(path: Path) -> list[str]:
    """The safetensors files of a checkpoint folder that the loader reads: those its index names, or model.safetensors
    (there or not yet: the hub download fetches exactly these, and none of the mistral repos' consolidated* copies)."""
    index = path / INDEX
    if not index.is_file():
        return [SINGLE_FILE]
    return sorted(set(_weight_map(index).values()))


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise TypeError("a file name that is not a string")
        return weight_map
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise FinetuneError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None


def check_weight_files(path: Path) -> None:
    """Each weight file's safetensors header read, and every tensor's byte range checked against the file's size:
    a missing, truncated or damaged file (an incomplete download) is refused in a moment, before a run starts,
    rather than when a stage loads the model. The tensor data is never read (8x7B's shards are ~90 GB)."""
    for name in _Checkpoint(path).files:
        file = path / name
        try:
            problem = _header_problem(file)
        except OSError as e:
            problem = e.strerror or str(e)
        if problem:
            raise _unreadable(file, problem)


def _header_problem(file: Path) -> str | None:
    """What safetensors refuses when it opens the file, found from the header alone: a header that is not one, a
    tensor whose dtype, shape and byte range disagree, or byte ranges that do not tile the data exactly (safe_open
    maps the whole file to check the same)."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            return f"the file holds {size} bytes, too few for its header"
        if length > MAX_HEADER:  # a damaged length: reading it would read the tensor data
            return f"a damaged header (its length reads {length} bytes)"
        try:
            header = json.loads(f.read(length))
            tensors = sorted((_checked_entry(entry), key) for key, entry in header.items() if key != "__metadata__")
        except _BadEntry as e:
            return f"a damaged header: {e}"
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # not safetensors' fields
            return f"a damaged header ({type(e).__name__})"
    data, at = size - 8 - length, 0
    for (begin, end), key in tensors:
        if end > data:
            return f"truncated: tensor {key} ends at byte {end} of the data, but the file holds {data}"
        if begin != at:  # safetensors packs the tensors one after another, from byte 0
            return f"tensor {key} starts at byte {begin} of the data, where byte {at} was expected"
        at = end
    if at != data:
        return f"its {data} bytes of tensor data do not match the byte ranges its header gives (they end at {at})"
    return None


class _BadEntry(ValueError):
    """A tensor entry of a safetensors header that safetensors would refuse."""


# bits per element of each safetensors dtype
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
              "F64": 64, "I64": 64, "U64": 64}


def _checked_entry(entry: dict) -> tuple[int, int]:
    """A tensor's (begin, end) byte range, checked against its dtype and shape."""
    begin, end = entry["data_offsets"]
    shape = entry["shape"]
    if not all(type(n) is int and n >= 0 for n in (begin, end, *shape)):  # bool is an int too: not here
        raise _BadEntry(f"offsets {entry['data_offsets']} or shape {shape} are not counts")
    if entry["dtype"] not in DTYPE_BITS:
        raise _BadEntry(f"unknown dtype {entry['dtype']!r}")
    bits = DTYPE_BITS[entry["dtype"]] * math.prod(shape)
    if begin > end or bits != 8 * (end - begin):
        raise _BadEntry(f"a {entry['dtype']} tensor of shape {shape} in bytes {begin} to {end}")
    return begin, end


def _unreadable(file: Path, cause) -> FinetuneError:
    return FinetuneError(f"{file}: cannot be read ({cause}); download the checkpoint again")


class _Checkpoint:
    """The safetensors files of a checkpoint folder (the index's shards, or model.safetensors), read one tensor at
    a time; it remembers which file each tensor came from, for errors that name it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.weight_map: dict[str, str] = {}
        self.source: dict[str, Path] = {}
        if (path / INDEX).is_file():
            self.weight_map = _weight_map(path / INDEX)
            self.files = sorted(set(self.weight_map.values()))
        elif (path / SINGLE_FILE).is_file():
            self.files = [SINGLE_FILE]
        else:
            raise FinetuneError(f"{path}: neither {INDEX} nor {SINGLE_FILE}; finetune reads safetensors checkpoints")

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        for name in self.files:
            file = self.path / name
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        tensor = f.get_tensor(key)
                        self.source[key] = file
                        yield key, tensor
            except (OSError, SafetensorError) as e:  # a missing, truncated or damaged file: an incomplete download
                raise _unreadable(file, e) from None

    def where(self, key: str) -> str:
        """The file to blame for a problem with `key`: where it was read, or where it should have been."""
        if key in self.source:
            return str(self.source[key])
        if key in self.weight_map:
            return f"{self.path / self.weight_map[key]} (where {INDEX} places it, but it is not there)"
        return str(self.path / (INDEX if self.weight_map else SINGLE_FILE))


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


def _module_of(state: _Loading, name: str, key: str) -> tuple[nn.Module, str]:
    """The module holding parameter `name` and the parameter's own name; `key`: its name in the checkpoint."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = state.model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or leaf not in module._parameters:
        raise CheckpointKeyError(key, f"not a weight of a Mixtral model with config.json's "
                                      f"{state.model.config.num_hidden_layers} layers")
    return module, leaf


def _set_parameter(state: _Loading, name: str, tensor: torch.Tensor, key: str | None = None) -> None:
    module, leaf = _module_of(state, name, key or name)
    expected = module._parameters[leaf].shape
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointKeyError(key or name, f"shape {tuple(tensor.shape)}, but config.json makes it {tuple(expected)}")
    value = tensor.to(state.device, state.compute_dtype)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())
    state.ledger.add(value.numel() * value.element_size())
    state.loaded.add(name)


def _install_linear4bit(state: _Loading, name: str, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old, _ = _module_of(state, name, name)
    parent_name, _, child = name.removesuffix(".weight").rpartition(".")
    if tuple(weight.shape) != (old.out_features, old.in_features):
        raise CheckpointKeyError(name, f"shape {tuple(weight.shape)}, but config.json makes it "
                                       f"{(old.out_features, old.in_features)}")
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
    config = state.model.config
    if layer >= config.num_hidden_layers or expert >= config.num_local_experts:
        raise CheckpointKeyError(key, f"not in a model with config.json's {config.num_hidden_layers} layers of "
                                      f"{config.num_local_experts} experts")
    stacks = _stacks(state, layer, tensor.dtype)
    slot = _slot(stacks, expert, proj)
    if tuple(tensor.shape) != tuple(slot.shape):
        raise CheckpointKeyError(key, f"shape {tuple(tensor.shape)}, but config.json makes it {tuple(slot.shape)}")
    if (expert, proj) in stacks.received:
        raise CheckpointKeyError(key, "appears twice in the checkpoint")
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
    if RECOMPUTED.search(key):
        return
    if m := EXPERT_WEIGHT.match(key):
        _take_expert_tensor(state, key, int(m[1]), int(m[2]), m[3], tensor)
    elif m := FUSED_EXPERTS.match(key):  # a checkpoint already in transformers-5 layout
        _take_expert_tensor(state, key, int(m[1]), -1, m[2], tensor)
    elif state.quant is not None and ATTENTION_WEIGHT.match(key):
        _install_linear4bit(state, key, tensor)
    else:
        _set_parameter(state, key.replace(".block_sparse_moe.gate.", ".mlp.gate."), tensor, key)


def _finish(state: _Loading) -> None:
    """Tie embeddings, rebuild the rotary buffers (created on meta), and refuse anything left unloaded."""
    model, config = state.model, state.model.config
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary_cls(config).to(state.device)
    missing = [key for layer, stacks in state.pending.items() for key in _missing_expert_keys(layer, stacks, config)]
    incomplete = tuple(f"model.layers.{layer}.mlp.experts." for layer in state.pending)  # named just above
    missing += [_checkpoint_name(n) for n, t in [*model.named_parameters(), *model.named_buffers()]
                if t.device.type == "meta" and not n.startswith(incomplete)]
    if missing:
        more = f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else ""
        untied = " (config.json: tie_word_embeddings is false)" if missing[0] == "lm_head.weight" else ""
        raise CheckpointKeyError(missing[0], f"missing from the checkpoint{more}{untied}")


def _missing_expert_keys(layer: int, stacks: _ExpertStacks, config) -> list[str]:
    if any(expert < 0 for expert, _ in stacks.received):  # a fused checkpoint
        return [f"model.layers.{layer}.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")
                if (-1, p) not in stacks.received]
    return [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{p}.weight" for e in range(config.num_local_experts)
            for p in ("w1", "w2", "w3") if (e, p) not in stacks.received]


def _checkpoint_name(name: str) -> str:
    """A model tensor's name as the hub's Mixtral checkpoints write it (for a whole stack, its first expert's)."""
    name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    name = re.sub(r"\.mlp\.experts\.gate_up_proj$", ".block_sparse_moe.experts.0.w1.weight", name)
    return re.sub(r"\.mlp\.experts\.down_proj$", ".block_sparse_moe.experts.0.w2.weight", name)


def load_mixtral(
    path: str | Path,
    *,
    quant: str | None = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> tuple[nn.Module, LoadReport]:
    """Load a Mixtral checkpoint: quant "nf4"/"fp4" (attention Linear4bit + QuantizedExperts) or None (stock layout).

    A checkpoint that does not fit config.json (a missing, unexpected or misshapen tensor) or a file that cannot be
    read is a FinetuneError naming the file and the tensor."""
    path = Path(path)
    config = mixtral_config(path)
    checkpoint = _Checkpoint(path)
    try:
        return load_mixtral_tensors(config, checkpoint.tensors(), quant=quant, double_quant=double_quant,
                                    compute_dtype=compute_dtype, device=device)
    except CheckpointKeyError as e:
        raise FinetuneError(f"{checkpoint.where(e.key)}: {e}") from None


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
