"""What a loaded Mixtral holds (bytes per part) and what a peft model trains (parameters per target group)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

PARTS = ("attention", "experts", "router", "embeddings", "norms", "lm_head", "other")


@dataclass(frozen=True)
class PartBytes:
    bytes: int
    quantized: bool


def part_of(name: str) -> str:
    """Which part of Mixtral a parameter/buffer name belongs to (names of the transformers-5 model)."""
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts" in name:
        return "experts"
    if ".mlp.gate" in name:
        return "router"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norms"
    return "other"


def _tensors_with_names(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers, plus the bitsandbytes quant-state tensors that live outside both."""
    out: list[tuple[str, torch.Tensor]] = [*model.named_parameters(), *model.named_buffers()]
    for name, param in model.named_parameters():
        qs = getattr(param, "quant_state", None)
        if qs is None:
            continue
        out += [(name, t) for t in (qs.absmax, qs.code, qs.offset) if t is not None]
        if qs.state2 is not None:
            out += [(name, qs.state2.absmax), (name, qs.state2.code)]
    return out


def measure_parts(model: nn.Module) -> dict[str, PartBytes]:
    """Bytes per part, each storage counted once (tied embeddings, shared codebooks)."""
    seen: set[int] = set()
    sizes = {p: 0 for p in PARTS}
    quantized = {p: False for p in PARTS}
    for name, t in _tensors_with_names(model):
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        part = part_of(name)
        sizes[part] += t.untyped_storage().nbytes()
        quantized[part] |= t.dtype == torch.uint8
    return {p: PartBytes(sizes[p], quantized[p]) for p in PARTS if sizes[p]}


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.3f} MiB"


@dataclass(frozen=True)
class LoadReport:
    quant: str | None
    double_quant: bool
    compute_dtype: str
    device: str
    parts: dict[str, PartBytes]
    peak_bytes: int
    peak_method: str
    host_rss_growth_bytes: int  # growth of the process's max RSS; 0 if an earlier peak was already higher

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.parts.values())

    def format(self) -> str:
        rows = [f"{'part':<11} {'bytes':>14} {'size':>12}  quantized"]
        rows += [f"{n:<11} {p.bytes:>14,} {_gib(p.bytes):>12}  {'yes' if p.quantized else 'no'}" for n, p in self.parts.items()]
        rows.append(f"{'total':<11} {self.total_bytes:>14,} {_gib(self.total_bytes):>12}")
        rows.append(f"quant={self.quant} double_quant={self.double_quant} compute={self.compute_dtype} device={self.device}")
        rows.append(f"load peak: {_gib(self.peak_bytes)} ({self.peak_method}); host max-RSS growth: {_gib(self.host_rss_growth_bytes)}")
        return "\n".join(rows)


@dataclass
class TrainableReport:
    attention: dict[str, int] = field(default_factory=dict)  # q_proj/k_proj/v_proj/o_proj -> params (all layers)
    experts: dict[str, list[int]] = field(default_factory=dict)  # w1/w2/w3 -> params per expert (all layers)
    router: int = 0
    other: dict[str, int] = field(default_factory=dict)  # anything else trainable, by name: should be empty

    @property
    def total(self) -> int:
        return sum(self.attention.values()) + sum(map(sum, self.experts.values())) + self.router + sum(self.other.values())

    def format(self) -> str:
        rows = [f"{'group':<22} {'trainable':>12}"]
        rows += [f"attention.{k:<12} {v:>12,}" for k, v in sorted(self.attention.items())]
        for proj, per_expert in sorted(self.experts.items()):
            rows.append(f"experts.{proj:<14} {sum(per_expert):>12,}  per expert: {per_expert}")
        rows.append(f"{'router':<22} {self.router:>12,}")
        rows += [f"other {k:<16} {v:>12,}" for k, v in self.other.items()]
        rows.append(f"{'total':<22} {self.total:>12,}")
        return "\n".join(rows)


def trainable_report(peft_model: nn.Module) -> TrainableReport:
    """Trainable parameters per target group; expert LoRA counted per expert (slices of the stacked tensors)."""
    import re

    report = TrainableReport()
    expert_param = re.compile(r"\.experts\.lora_[AB]\.[^.]+\.(w[123])$")
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if m := expert_param.search(name):
            counts = report.experts.setdefault(m[1], [0] * p.shape[0])
            for e in range(p.shape[0]):
                counts[e] += p[e].numel()
        elif m := re.search(r"\.self_attn\.([qkvo]_proj)\.", name):
            report.attention[m[1]] = report.attention.get(m[1], 0) + p.numel()
        elif ".mlp.gate." in name:
            report.router += p.numel()
        else:
            report.other[name] = p.numel()
    return report
