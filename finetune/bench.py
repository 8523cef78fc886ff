"""QLoRA training speed and memory of Mixtral-8x7B on one GPU: our grouped 4-bit experts against a naive path.

    python -m finetune.bench                 # GPU: full 8x7B shape (32 layers, random weights), seq 2048 and 4096
    python -m finetune.bench --tiny          # the tiny model (the default without a GPU), same table
    finetune bench --seqs 4096 --no-naive

Both paths: the model built directly in 4-bit (NF4, double quantization), LoRA r=16 (alpha 32) on q/k/v/o and
on every expert's w1/w2/w3, gradient checkpointing, batch 1, AdamW, a bf16 model run under bf16 autocast as
the trainer runs it (`as_trained`); tokens/s is seq / median step time over
`--steps` steps after `--warmup` (both paths the same tokens), peak is torch.cuda.max_memory_allocated over the
warm-up and timed steps (weights included; reserved: what the caching allocator held, max_memory_reserved),
host s (GPU) the median time until the host had issued a step's last kernel (well under step s: GPU-bound).
  fast:  QuantizedExperts + the grouped kernel, the chunked cross-entropy, 8-bit AdamW states (GPU, --full-shape;
         `finetune.optimizers.AdamW8bit`, the recipe's `adamw_8bit`).
  naive: one bitsandbytes Linear4bit per expert projection, a Python loop over experts (peft LoRA on each),
         transformers' own loss, fp32 AdamW states: the usual QLoRA set-up.
Before timing, the fast kernel is checked against the reference loop (one layer's experts, then the whole
model's loss and every LoRA gradient, attention's and the experts'); no speed is reported for it if the check
fails.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from finetune.cli import at_least

GIB = 2**30
LORA_R, LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class Tolerance:
    """Relative errors (||fast - reference|| / ||reference||) the fast kernel may show."""

    layer: float  # one layer's experts: output, input gradient, each LoRA gradient (A and B, all experts)
    loss: float  # whole model: |loss difference| / loss ...
    grads: float  # ... and the LoRA gradients of the experts together, and of attention together,
    floor_factor: float = 2.0  # or up to this many times what one bf16 rounding of the input does to the reference


# fp32 on CPU: summation order only. bf16 on GPU: the reference computes LoRA in fp32 and rounds per expert;
# a deep random-weight model amplifies any rounding difference on the way back through its layers, hence
# the whole-model figures are also judged against the reference's own sensitivity (the noise floor).
TOLERANCE = {torch.float32: Tolerance(layer=1e-4, loss=1e-4, grads=1e-3),
             torch.bfloat16: Tolerance(layer=3e-2, loss=1e-2, grads=5e-2)}


@dataclass
class CheckResult:
    layer: dict[str, float]
    model: "ModelComparison"
    passed: bool = False

    def format(self, tol: Tolerance) -> str:
        worst_layer = max(self.layer.items(), key=lambda kv: kv[1])
        m = self.model
        return (f"check fast vs reference: layer-0 experts worst rel err {worst_layer[1]:.2e} ({worst_layer[0]}) "
                f"[tol {tol.layer:g}]\n  whole model (same routing): loss rel {m.loss:.2e}, LoRA grads rel "
                f"{_by_group(m.grads, m.tensors)} (worst tensor {m.worst[0]} {m.worst[1]:.2e}); reference vs itself "
                f"with the input rounded differently: loss {m.floor_loss:.2e}, grads {_by_group(m.floor_grads)} [tol: "
                f"loss {tol.loss:g}, grads {tol.grads:g} each, or {tol.floor_factor:g}x that floor] -> "
                f"{'PASS' if self.passed else 'FAIL'}")


def _by_group(values: dict[str, float], counts: dict[str, int] | None = None) -> str:
    return ", ".join(f"{group} {value:.2e}" + (f" ({counts[group]} tensors)" if counts else "")
                     for group, value in values.items())


@dataclass
class Row:
    path: str
    seq: int
    tokens_per_s: float | None
    step_s: float | None
    peak_gib: float | None
    loss: float | None
    note: str = ""
    # GPU: median seconds until the host had issued the step's last kernel. Well under step_s: the host ran ahead
    # and the kernels bound the step. Near it: the host bound it, or CUDA's launch queue was full and held the host
    # back (the profile's CPU and GPU times tell which).
    host_s: float | None = None
    reserved_gib: float | None = None


# ---------------------------------------------------------------- models


def build_model(tiny: bool, device: str, layers: int | None = None, dtype: torch.dtype | None = None):
    """Mixtral (full 8x7B widths, or the tiny config) made from random weights straight into 4-bit on `device`;
    compute in `dtype` (default: bfloat16 on a GPU, float32 on CPU)."""
    from transformers import MixtralConfig

    from finetune.moe.full_shape import MIXTRAL_8X7B, random_checkpoint
    from finetune.moe.loader import load_mixtral_tensors
    from finetune.moe.tiny import TINY_MIXTRAL

    shape = dict(TINY_MIXTRAL) if tiny else dict(MIXTRAL_8X7B)
    if layers:
        shape["num_hidden_layers"] = layers
    config = MixtralConfig(**shape)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    model, _ = load_mixtral_tensors(config, random_checkpoint(config, device), quant="nf4", double_quant=True,
                                    compute_dtype=dtype, device=device)
    return model


class LoopExperts(nn.Module):
    """The naive experts: one Linear4bit per expert projection (transformers-4 style), a Python loop.

    Projections are named e_gate/e_up/e_down: peft 0.21 rewrites w1/w2/w3 for mixtral to the fused parameters.
    """

    def __init__(self, quantized) -> None:
        super().__init__()
        self.num_experts = quantized.num_experts
        self.act_fn = quantized.act_fn
        inter, dtype = quantized.intermediate_dim, quantized.compute_dtype
        device = quantized.gate_up_proj.data.device
        self.experts = nn.ModuleList()
        for e in range(self.num_experts):
            gate_up = quantized.gate_up_proj.dequantize_expert(e, dtype)
            down = quantized.down_proj.dequantize_expert(e, dtype)
            expert = nn.Module()
            expert.e_gate = _linear4bit(gate_up[:inter], dtype, device)
            expert.e_up = _linear4bit(gate_up[inter:], dtype, device)
            expert.e_down = _linear4bit(down, dtype, device)
            self.experts.append(expert)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            y = expert.e_down(self.act_fn(expert.e_gate(x)) * expert.e_up(x)) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _linear4bit(weight: torch.Tensor, dtype: torch.dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4", device="meta")
    param = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, blocksize=64, compress_statistics=True,
                              quant_type="nf4", module=layer)
    layer.weight = param._quantize(device)
    layer.support_avx512bf16_for_cpu = False
    return layer


def to_naive(model) -> None:
    """Replace every layer's QuantizedExperts by LoopExperts (same dequantized weights, re-quantized per expert)."""
    for layer in model.model.layers:
        layer.mlp.experts = LoopExperts(layer.mlp.experts)
        gc.collect()


def with_lora(model, naive: bool):
    from peft import LoraConfig, get_peft_model

    from finetune.moe import build_lora_config

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if naive:
        config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "e_gate", "e_up", "e_down"])
    else:
        config = build_lora_config(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


# ---------------------------------------------------------------- correctness


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_layer(experts, tokens: int, seed: int = 0) -> dict[str, float]:
    """One layer's QuantizedExperts with a random (non-zero) adapter: fast vs reference output and gradients."""
    from finetune.moe.quantized_experts import ExpertLoraDelta, expert_forward

    device, dtype = experts.gate_up_proj.data.device, experts.compute_dtype
    gen = torch.Generator(device).manual_seed(seed)
    e, h, i = experts.num_experts, experts.hidden_dim, experts.intermediate_dim

    def rand(*shape, std):
        return (torch.randn(shape, generator=gen, device=device) * std).requires_grad_()

    a = {"w1": rand(e, LORA_R, h, std=h**-0.5), "w3": rand(e, LORA_R, h, std=h**-0.5), "w2": rand(e, LORA_R, i, std=i**-0.5)}
    b = {"w1": rand(e, i, LORA_R, std=0.02), "w3": rand(e, i, LORA_R, std=0.02), "w2": rand(e, h, LORA_R, std=0.02)}
    delta = ExpertLoraDelta(a, b, LORA_ALPHA / LORA_R, nn.Identity())
    x = torch.randn(tokens, h, generator=gen, device=device).to(dtype)
    weights, index = torch.randn(tokens, e, generator=gen, device=device).softmax(-1).topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    probe = torch.randn(tokens, h, generator=gen, device=device)
    out = {}
    for kernel in ("reference", "grouped"):
        xx = x.clone().requires_grad_()
        y = expert_forward(xx, index, weights, experts, [delta], kernel=kernel)
        grads = torch.autograd.grad((y.float() * probe).sum(), [xx, *a.values(), *b.values()])
        out[kernel] = [y.detach(), *grads]
    names = ["output", "input grad", *(f"A.{p} grad" for p in a), *(f"B.{p} grad" for p in b)]
    return {n: _rel(f, r) for n, f, r in zip(names, out["grouped"], out["reference"])}


class _ReplayRouting:
    """Record each router's top-k experts in one run and impose them in the next (weights recomputed from that
    run's own router logits, so gradients still flow): a near-tie token that rounding would send to another
    expert in one of two runs makes the whole-model comparison measure that flip, not the kernel."""

    def __init__(self, model) -> None:
        self.routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        self.recorded: dict[int, torch.Tensor] = {}
        self.handles = []

    def record(self) -> None:
        self._hook(self._keep)

    def replay(self) -> None:
        self._hook(self._impose)

    def _keep(self, i: int, out):
        self.recorded.setdefault(i, out[2].detach().clone())  # the recomputation routes the same way
        return out

    def _impose(self, i: int, out):
        logits, index = out[0], self.recorded[i]
        weights = torch.softmax(logits.float(), -1).gather(1, index)
        return logits, weights / weights.sum(-1, keepdim=True), index

    def _hook(self, fn) -> None:
        self.remove()
        self.handles = [r.register_forward_hook(lambda m, args, out, i=i: fn(i, out)) for i, r in enumerate(self.routers)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class _PerturbInput:
    """Multiply the embeddings by (1 + eps * noise): one rounding step of the compute dtype, the size of the
    kernels' own differences. How far that moves the reference is the noise floor the fast kernel is judged against."""

    def __init__(self, model, seed: int) -> None:
        self.embed = model.get_input_embeddings()
        self.seed = seed
        self.handle = None

    def __enter__(self):
        def hook(module, args, out):
            gen = torch.Generator(out.device).manual_seed(self.seed)
            noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
            return (out.float() * (1 + noise * torch.finfo(out.dtype).eps)).to(out.dtype)

        self.handle = self.embed.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@dataclass
class ModelComparison:
    loss: float  # fast vs reference, |d loss| / loss
    # fast vs reference, the LoRA gradients of each group together ("experts", "attention"): apart, so that the
    # larger attention gradients cannot hide an error in the experts', which the fast kernel computes
    grads: dict[str, float]
    worst: tuple[str, float]  # fast vs reference, the worst single tensor
    floor_loss: float  # reference vs reference with perturbed input
    floor_grads: dict[str, float]
    tensors: dict[str, int]  # how many LoRA gradients each group compared


def _grads_rel(fast: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    diff = sum((fast[n].float() - ref[n].float()).square().sum() for n in ref).sqrt()
    return (diff / sum(g.float().square().sum() for g in ref.values()).sqrt()).item()


def check_model(peft_model, seq: int, loss_fn: Callable, seed: int = 0) -> ModelComparison:
    """Whole model, random non-zero LoRA B: loss and every LoRA gradient, fast kernel vs reference loop. The
    attention adapters' gradients count too: they flow back through every later layer's experts.

    All runs follow the first run's routing (`_ReplayRouting`); a third run (reference, input perturbed by
    one bf16 rounding step) measures how much rounding alone moves these figures in this model.
    """
    from finetune.moe.quantized_experts import set_expert_kernel

    device = next(peft_model.parameters()).device
    lora = {n: p for n, p in peft_model.named_parameters() if ".lora_" in n and p.requires_grad}
    gen = torch.Generator(device).manual_seed(seed)
    ids = torch.randint(0, peft_model.config.vocab_size, (1, seq), generator=gen, device=device)
    saved_b = {n: p.detach().clone() for n, p in lora.items() if ".lora_B." in n}
    with torch.no_grad():
        for n in saved_b:
            lora[n].normal_(0, 0.02, generator=gen)
    routing = _ReplayRouting(peft_model)
    runs = {}

    def run(name: str, kernel: str) -> None:
        set_expert_kernel(peft_model, kernel)
        peft_model.zero_grad(set_to_none=True)
        loss = loss_fn(peft_model, ids)
        loss.backward()
        runs[name] = (loss.detach().float(), {n: p.grad.detach().clone() for n, p in lora.items()})

    try:
        routing.record()
        run("reference", "reference")
        routing.replay()
        run("grouped", "grouped")
        with _PerturbInput(peft_model, seed):
            run("perturbed", "reference")
    finally:
        routing.remove()
        set_expert_kernel(peft_model, "auto")
        peft_model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, value in saved_b.items():
                lora[n].copy_(value)
    (loss_ref, g_ref), (loss_fast, g_fast), (loss_pert, g_pert) = runs["reference"], runs["grouped"], runs["perturbed"]
    groups = {group: [n for n in g_ref if (".experts." in n) == (group == "experts")]
              for group in ("experts", "attention")}
    groups = {group: names for group, names in groups.items() if names}

    def rel(grads: dict[str, torch.Tensor]) -> dict[str, float]:
        return {group: _grads_rel({n: grads[n] for n in names}, {n: g_ref[n] for n in names})
                for group, names in groups.items()}

    return ModelComparison(
        loss=(abs(loss_fast - loss_ref) / abs(loss_ref)).item(),
        grads=rel(g_fast),
        worst=max(((n, _rel(g_fast[n], g_ref[n])) for n in g_ref), key=lambda kv: kv[1]),
        floor_loss=(abs(loss_pert - loss_ref) / abs(loss_ref)).item(),
        floor_grads=rel(g_pert),
        tensors={group: len(names) for group, names in groups.items()},
    )


def check_fast_path(peft_model, seq: int, loss_fn: Callable, tol: Tolerance) -> CheckResult:
    from finetune.moe.quantized_experts import QuantizedExperts

    experts = next(m for m in peft_model.modules() if isinstance(m, QuantizedExperts))
    result = CheckResult(layer=check_layer(experts, tokens=seq), model=check_model(peft_model, seq, loss_fn))
    m = result.model
    result.passed = (max(result.layer.values()) <= tol.layer
                     and m.loss <= max(tol.loss, tol.floor_factor * m.floor_loss)
                     and all(m.grads[g] <= max(tol.grads, tol.floor_factor * m.floor_grads[g]) for g in m.grads))
    return result


# ---------------------------------------------------------------- timing


def fast_loss(model, ids):
    from finetune.moe.loss import causal_lm_loss

    return causal_lm_loss(model, ids, ids)


def naive_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def as_trained(loss_fn: Callable) -> Callable:
    """`loss_fn` the way the trainer runs a bfloat16 model: inside accelerate's bf16 autocast. There peft feeds a
    LoRA its bf16 input as it is, where without autocast it casts one fp32 copy per projection to match the fp32
    adapter weights (q, k, v and o each keep their own for the backward: 0.25 GiB a layer at 4k tokens). peft asks
    only CUDA's autocast, so on a CPU (`--full-shape`) its cast is switched off to the same effect."""
    def run(model, ids):
        if model.get_input_embeddings().weight.dtype != torch.bfloat16:
            return loss_fn(model, ids)
        from peft.helpers import disable_input_dtype_casting

        with torch.autocast(ids.device.type, dtype=torch.bfloat16), \
                disable_input_dtype_casting(model, active=ids.device.type != "cuda"):
            return loss_fn(model, ids)

    return run


def make_optimizer(params, low_memory: bool, in_backward: bool = False):
    """AdamW (8-bit states when `low_memory`: the recipe's `adamw_8bit`), stepped after the backward or,
    `in_backward`, inside it."""
    if low_memory:
        from finetune.optimizers import AdamW8bit

        name = "AdamW 8-bit"

        def adamw(group):
            return AdamW8bit(group, lr=1e-5, optim_bits=8)
    else:
        name = "AdamW fp32"

        def adamw(group):
            return torch.optim.AdamW(group, lr=1e-5)
    if in_backward:
        return StepInBackward(params, adamw), f"{name} stepped in the backward"
    return adamw(params), name


class StepInBackward:
    """One optimizer per weight, stepped as soon as that weight's gradient is complete, which is then freed.

    The same update as stepping every weight after the backward wherever nothing needs all gradients at once:
    the bench neither clips by the global norm nor accumulates micro-batches. What it saves is the gradients:
    they no longer all exist together at the end of the backward (fp32, the size of the adapter). `step` and
    `zero_grad` are no-ops, so a loop written for an ordinary optimizer runs unchanged.
    """

    def __init__(self, params, make) -> None:
        self.optimizers = {p: make([p]) for p in params}
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.optimizers]

    def _step(self, param: torch.Tensor) -> None:
        optimizer = self.optimizers[param]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers.values() for p, s in optimizer.state.items()}

    def step(self) -> None:
        """Done in the backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Freed in the backward."""

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(peft_model, seq: int) -> torch.Tensor:
    """The same random tokens for every path at a length: the routing (how many tokens each expert gets, which the
    naive loop's time depends on) and the loss column then compare like with like."""
    device = next(peft_model.parameters()).device
    gen = torch.Generator(device).manual_seed(seq)
    return torch.randint(0, peft_model.config.vocab_size, (1, seq), generator=gen, device=device)


def time_steps(peft_model, loss_fn: Callable, optimizer, seq: int, steps: int,
               warmup: int) -> tuple[float, float | None, tuple[float, float] | None, float]:
    """(median step seconds, median host seconds or None on CPU, (peak allocated, peak reserved) GiB or None on CPU,
    last loss) over `steps` after `warmup` steps. Host seconds: until the step's last kernel was issued, before
    waiting for the GPU."""
    device = next(peft_model.parameters()).device
    ids = _tokens(peft_model, seq)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, issued = [], []
    for i in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        loss = loss_fn(peft_model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        launched = time.perf_counter()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
            issued.append(launched - started)
    if device.type != "cuda":  # nothing runs ahead of the host: its time is the step's
        return statistics.median(times), None, None, loss.item()
    peak = torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB
    return statistics.median(times), statistics.median(issued), peak, loss.item()


def measure(peft_model, loss_fn, optimizer, label: str, seqs, steps: int, warmup: int, note: str, log) -> list[Row]:
    rows = []
    for seq in seqs if steps else ():  # --steps 0: no timing (e.g. only --memory)
        try:
            step_s, host_s, peak, loss = time_steps(peft_model, loss_fn, optimizer, seq, steps, warmup)
            peak_gib, reserved_gib = peak or (None, None)
            rows.append(Row(label, seq, seq / step_s, step_s, peak_gib, loss, note, host_s, reserved_gib))
        except torch.cuda.OutOfMemoryError as e:  # a path that does not fit is a result, not a crash
            rows.append(Row(label, seq, None, None, None, None, f"out of memory: {str(e)[:80]}"))
            peft_model.zero_grad(set_to_none=True)  # a half-done backward's gradients would swell the next peak
        log(format_row(rows[-1]))
    return rows


def report_host_syncs(peft_model, loss_fn: Callable, optimizer, seq: int, log) -> None:
    """One step under `finetune.syncs.HostSyncs`: what makes the host wait for the device, and where. On a CPU,
    the forward and backward only, and the gradients are not handed to the optimizer (its step counters live
    on the host in a GPU run too)."""
    from finetune.syncs import HostSyncs

    device = next(peft_model.parameters()).device
    ids = torch.randint(0, peft_model.config.vocab_size, (1, seq), device=device)
    with HostSyncs(device.type) as syncs:
        if device.type == "cuda":
            loss_fn(peft_model, ids).backward()
            optimizer.step()
        else:
            torch.autograd.grad(loss_fn(peft_model, ids), [p for p in peft_model.parameters() if p.requires_grad])
    optimizer.zero_grad(set_to_none=True)
    scope = "step" if device.type == "cuda" else "forward and backward"
    log(f"host syncs in one fast {scope} at seq {seq}: {len(syncs.found)} ({syncs.summary()}); "
        f"{syncs.ops:,} ops dispatched on {device.type}")


def account_memory(peft_model, loss_fn: Callable, optimizer, label: str, seqs, log) -> None:
    """One step per sequence length under `finetune.memory.account_step`: where the peak comes from."""
    from finetune.memory import account_step

    device = next(peft_model.parameters()).device
    decoder = peft_model.get_base_model().model
    marks = [(f"layer {i}", layer.input_layernorm) for i, layer in enumerate(decoder.layers)] + [("head", decoder.norm)]
    for seq in seqs:
        ids = _tokens(peft_model, seq)
        try:  # the first step (which creates the optimizer state the accounted one starts with) may not fit either
            loss_fn(peft_model, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            step = account_step(peft_model, lambda: loss_fn(peft_model, ids), optimizer, marks)
        except torch.cuda.OutOfMemoryError as e:
            peft_model.zero_grad(set_to_none=True)
            log(f"memory of one {label} step at seq {seq}: out of memory ({str(e)[:80]})")
            continue
        log(f"memory of one {label} step at seq {seq} (live tensors on {device}):\n{step.format()}")


def profile(peft_model, loss_fn: Callable, optimizer, seq: int, log) -> None:
    """Where a fast step's GPU time goes (top kernels), and one layer's expert kernel per dequantization chunking."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from finetune.moe.dequant_kernel import strided_dequantizer
    from finetune.moe.quantized_experts import QuantizedExperts, expert_forward
    from finetune.syncs import HostSyncs

    device = next(peft_model.parameters()).device
    ids = torch.randint(0, peft_model.config.vocab_size, (1, seq), device=device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loss_fn(peft_model, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
    log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    layer = next(m for m in peft_model.modules() if hasattr(m, "deltas") and isinstance(m.get_base_layer(), QuantizedExperts))
    experts = layer.get_base_layer()
    chunks_before, strided_before = experts.dequant_chunks, experts.strided_dequant
    x = torch.randn(seq, experts.hidden_dim, device=device, dtype=experts.compute_dtype).requires_grad_()
    weights, index = torch.randn(x.shape[0], experts.num_experts, device=device).softmax(-1).topk(2, dim=-1)
    # each chunking with bitsandbytes' calls and, unless it is off or missing, the one-launch strided dequantizer
    with_strided = strided_before and device.type == "cuda" and strided_dequantizer() is not None
    runs = [(chunks, strided) for chunks in (1, 2, 4, 8) for strided in (True, False) if with_strided or not strided]
    for chunks, strided in runs:
        experts.dequant_chunks, experts.strided_dequant = chunks, strided
        with HostSyncs(device.type) as dispatched:  # the first call (a warm-up) counts the ops
            y = expert_forward(x, index, weights, experts, layer.deltas(), kernel="grouped")
            y.backward(torch.ones_like(y))
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        for _ in range(3):
            y = expert_forward(x, index, weights, experts, layer.deltas(), kernel="grouped")
            y.backward(torch.ones_like(y))
        _sync(device)
        how = ", strided dequantizer" if strided else ", bitsandbytes calls"
        log(f"one layer, {x.shape[0]} tokens, chunks={chunks}{how}: fwd+bwd "
            f"{(time.perf_counter() - started) / 3 * 1e3:.1f} ms, {dispatched.ops} ops, transient peak "
            f"{(torch.cuda.max_memory_allocated(device) - base) / GIB:.2f} GiB")
    experts.dequant_chunks, experts.strided_dequant = chunks_before, strided_before


# ---------------------------------------------------------------- report


def format_row(r: Row) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    return (f"| {r.path} | {r.seq} | {num(r.tokens_per_s, ',.0f')} | {num(r.step_s, '.3f')} | {num(r.host_s, '.3f')} "
            f"| {num(r.peak_gib, '.2f')} | {num(r.reserved_gib, '.2f')} | {num(r.loss, '.4f')} | {r.note} |")


def format_table(rows: list[Row]) -> str:
    lines = ["| path | seq | tokens/s | step s | host s | peak GiB | reserved GiB | loss | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [format_row(r) for r in rows]
    for seq in sorted({r.seq for r in rows}):
        fast = next((r for r in rows if r.path == "fast" and r.seq == seq and r.tokens_per_s), None)
        naive = next((r for r in rows if r.path == "naive" and r.seq == seq and r.tokens_per_s), None)
        if fast and naive:
            lines.append(f"seq {seq}: fast / naive = {fast.tokens_per_s / naive.tokens_per_s:.2f}x")
    return "\n".join(lines)


def traffic_table(tiny: bool, seqs, layers: int | None) -> str:
    """`finetune.moe.traffic` for each chunking: what one layer's experts make a GPU do per training step."""
    from finetune.moe.full_shape import MIXTRAL_8X7B
    from finetune.moe.tiny import TINY_MIXTRAL
    from finetune.moe.traffic import expert_layer_traffic

    shape = TINY_MIXTRAL if tiny else MIXTRAL_8X7B
    layers = layers or shape["num_hidden_layers"]
    lines = [f"{'tiny' if tiny else 'Mixtral-8x7B'} widths, one layer's experts per training step (forward twice "
             f"with gradient checkpointing, backward once), LoRA r{LORA_R} on w1/w2/w3, bf16, as a GPU with triton "
             f"runs them (counted on meta tensors by finetune.moe.traffic); last column: x {layers} layers",
             "| seq | chunks | matmul TFLOP | matmul GB | GB outside matmuls | ops | triton launches "
             "| GB outside matmuls, all layers |", "|---|---|---|---|---|---|---|---|"]
    for seq in seqs:
        for chunks in (1, 2, 4):
            forward, backward = expert_layer_traffic(shape["num_local_experts"], shape["hidden_size"],
                                                     shape["intermediate_size"], LORA_R, seq, chunks,
                                                     shape["num_experts_per_tok"])

            def per_step(field: str) -> int:
                return 2 * getattr(forward, field) + getattr(backward, field)

            lines.append(f"| {seq} | {chunks} | {per_step('matmul_flops') / 1e12:.3f} | "
                         f"{per_step('matmul_bytes') / 1e9:.2f} | {per_step('other_bytes') / 1e9:.2f} | "
                         f"{per_step('ops')} | {per_step('launches')} | {layers * per_step('other_bytes') / 1e9:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def _log(text: str) -> None:
    print(text, flush=True)  # each row as it is measured: a run stopped by a time limit keeps what it finished


def _unless_out_of_memory(what: str, log, diagnose: Callable, *args) -> None:
    """A diagnostic (profile) that does not fit is said, and the run goes on to the figures still to come."""
    try:
        diagnose(*args)
    except torch.cuda.OutOfMemoryError as e:
        log(f"{what}: out of memory ({str(e)[:80]})")


def run(args, log=_log) -> tuple[list[Row], CheckResult]:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    tiny = args.tiny or (device == "cpu" and not args.full_shape)
    dtype = torch.bfloat16 if device == "cuda" or args.full_shape else torch.float32
    low_memory = device == "cuda" or args.full_shape  # 8-bit optimizer states, as on a GPU
    seqs = args.seqs or ([2048, 4096] if device == "cuda" or not args.quick else [64, 128])
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model(tiny, device, args.layers, dtype)
    log(f"device {device}; {'tiny' if tiny else 'Mixtral-8x7B'} shape, {model.config.num_hidden_layers} layers, "
        f"attention {model.config._attn_implementation}; built in 4-bit in {time.perf_counter() - started:.1f} s")
    if device == "cuda":
        log(f"weights resident: {torch.cuda.memory_allocated() / GIB:.2f} GiB")
    from finetune.moe.quantized_experts import QuantizedExperts, set_expert_chunks, set_expert_kernel

    set_expert_chunks(model, args.chunks)  # as `stages[].expert_chunks` does in training
    for m in model.modules():
        if isinstance(m, QuantizedExperts):
            m.strided_dequant = not args.no_strided_dequant
    peft_model = with_lora(model, naive=False)
    tol = TOLERANCE[dtype]
    check = check_fast_path(peft_model, args.check_seq, as_trained(fast_loss), tol)
    log(check.format(tol))
    rows = []
    if check.passed:
        optimizer, opt_name = make_optimizer([p for p in peft_model.parameters() if p.requires_grad], low_memory,
                                             args.optimizer_in_backward)
        offload = None
        if args.offload_activations:  # as `stages[].offload_activations` does in training
            from finetune.offload import offload_during_forward

            offload = offload_during_forward(peft_model.get_base_model().model, device, log)
        loss_fn = as_trained(fast_loss)
        set_expert_kernel(peft_model, "grouped")  # what was checked, whatever FINETUNE_EXPERT_KERNEL says
        offloaded = ", layer inputs in host memory" if offload is not None else ""
        report_host_syncs(peft_model, loss_fn, optimizer, args.check_seq, log)
        rows += measure(peft_model, loss_fn, optimizer, "fast", seqs, args.steps, args.warmup,
                        f"grouped 4-bit experts, chunked CE, {opt_name}{offloaded}", log)
        if args.memory:
            account_memory(peft_model, loss_fn, optimizer, "fast", seqs, log)
        if args.profile and device == "cuda":
            _unless_out_of_memory("profile", log, profile, peft_model, loss_fn, optimizer, max(seqs), log)
        if isinstance(optimizer, StepInBackward):
            optimizer.remove()
        if offload is not None:
            offload.remove()
        del optimizer
    else:
        rows += [Row("fast", s, None, None, None, None, "NOT REPORTED: fast kernel failed the reference check") for s in seqs]
        if args.profile and device == "cuda":  # kernel timings only (no tokens/s): to find out why
            optimizer, _ = make_optimizer([p for p in peft_model.parameters() if p.requires_grad], True)
            _unless_out_of_memory("profile", log, profile, peft_model, as_trained(fast_loss), optimizer, max(seqs), log)
            del optimizer  # its state must not sit in the naive path's memory
    del peft_model, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if not args.no_naive:
        model = build_model(tiny, device, args.layers, dtype)
        to_naive(model)
        peft_model = with_lora(model, naive=True)
        optimizer, opt_name = make_optimizer([p for p in peft_model.parameters() if p.requires_grad], False)
        rows += measure(peft_model, as_trained(naive_loss), optimizer, "naive", seqs, args.naive_steps or args.steps,
                        args.warmup, f"Linear4bit per expert, loop, HF loss, {opt_name}", log)
        if args.memory:
            account_memory(peft_model, as_trained(naive_loss), optimizer, "naive", seqs, log)
    return rows, check


_count, _positive = at_least(0), at_least(1)
# a sequence length: one token has no next token to predict, so a training step needs two
_seq = at_least(2, " (a step predicts each next token)")


def _seqs(text: str) -> list[int]:
    return [_seq(v) for v in text.split(",")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="the tiny model (the default without a GPU)")
    p.add_argument("--full-shape", action="store_true",
                   help="the 8x7B widths even on CPU, in bfloat16 as on a GPU (slow there: for --memory with --layers 1)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    p.add_argument("--seqs", type=_seqs, default=None,
                   help="comma-separated sequence lengths (default 2048,4096)")
    p.add_argument("--quick", action="store_true", help="on CPU: short sequences (64,128) for a fast smoke run")
    p.add_argument("--layers", type=_positive, default=None, help="fewer layers than the model has (a quicker look)")
    p.add_argument("--steps", type=_count, default=5, help="timed steps per sequence length (median reported; 0: none)")
    p.add_argument("--naive-steps", type=_positive, default=None,
                   help="timed steps for the naive path (default --steps; none: --no-naive)")
    p.add_argument("--warmup", type=_count, default=2, help="untimed steps before the timed ones")
    p.add_argument("--check-seq", type=_seq, default=256, help="tokens for the fast-vs-reference check")
    p.add_argument("--chunks", type=_positive, default=None,
                   help="dequantization chunks per expert stack (default finetune.moe.grouped.DEFAULT_CHUNKS)")
    p.add_argument("--no-strided-dequant", action="store_true",
                   help="GPU: dequantize expert chunks with bitsandbytes' calls (one per expert and row group) "
                        "instead of finetune.moe.dequant_kernel's one launch (FINETUNE_STRIDED_DEQUANT=0 in training)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive path")
    p.add_argument("--profile", action="store_true", help="GPU: top kernels of one fast step, and one layer per chunking")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="fast path: step each weight's optimizer in the backward and free its gradient (the same "
                        "update here: the bench neither clips nor accumulates; saves the gradients' memory)")
    p.add_argument("--offload-activations", action="store_true",
                   help="fast path: keep the checkpointed layer inputs in host memory between forward and backward "
                        "(finetune.offload; the same computation, less device memory; on a GPU, copies over PCIe)")
    p.add_argument("--traffic", action="store_true",
                   help="only count what one layer's expert kernel makes a GPU do per step, for 1, 2 and 4 chunks: "
                        "matmul FLOPs, bytes moved outside the matmuls, ops, Triton launches (meta tensors: no GPU, "
                        "a second; the 8x7B widths unless --tiny; default seq 4096)")
    p.add_argument("--memory", action="store_true",
                   help="after timing, one step per path and length under live-tensor accounting (any device): "
                        "weights, adapter, optimizer state, checkpoints, gradients, peak and its largest tensors")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.tiny and args.full_shape:
        p.error("--tiny and --full-shape contradict each other; give one")
    if args.traffic:
        print(traffic_table(args.tiny, args.seqs or [4096], args.layers))
        return 0
    return cmd_bench(args)


def cmd_bench(args) -> int:
    rows, check = run(args)
    print(format_table(rows))
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
