"""Build the full Mixtral-8x7B shape (random weights) directly in 4-bit on a GPU and report its memory.

The weights are made on the GPU tensor by tensor, in checkpoint order and naming, and go through the same
streaming loader as a real checkpoint, so the figures are those of loading Mixtral-8x7B itself:

    python -m finetune.moe.full_shape                 # 32 layers: weight memory, load peak, one LoRA step
    python -m finetune.moe.full_shape --layers 2 --train-seq 0
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Iterator

import torch

MIXTRAL_8X7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
    rope_theta=1e6, rms_norm_eps=1e-5,
)
GIB = 2**30


def random_checkpoint(config, device: str, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Mixtral checkpoint tensors (original names) with N(0, 0.02) weights, made one at a time on `device`."""
    generator = torch.Generator(device).manual_seed(seed)
    hidden, inter, experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    head_dim = hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16).mul_(0.02)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=torch.bfloat16)

    yield "model.embed_tokens.weight", weight(config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", ones(hidden)
        yield f"{p}.post_attention_layernorm.weight", ones(hidden)
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            yield f"{p}.self_attn.{name}.weight", weight(out, hidden)
        yield f"{p}.self_attn.o_proj.weight", weight(hidden, q_out)
        yield f"{p}.block_sparse_moe.gate.weight", weight(experts, hidden)
        for e in range(experts):
            yield f"{p}.block_sparse_moe.experts.{e}.w1.weight", weight(inter, hidden)
            yield f"{p}.block_sparse_moe.experts.{e}.w2.weight", weight(hidden, inter)
            yield f"{p}.block_sparse_moe.experts.{e}.w3.weight", weight(inter, hidden)
    yield "model.norm.weight", ones(hidden)
    yield "lm_head.weight", weight(config.vocab_size, hidden)


def build(layers: int, quant: str, double_quant: bool, device: str = "cuda"):
    from transformers import MixtralConfig

    from finetune.moe.loader import load_mixtral_tensors

    config = MixtralConfig(**{**MIXTRAL_8X7B, "num_hidden_layers": layers})
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    model, report = load_mixtral_tensors(config, random_checkpoint(config, device), quant=quant,
                                         double_quant=double_quant, compute_dtype=torch.bfloat16, device=device)
    gc.collect()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() - before
    return model, report, resident, time.perf_counter() - started


def check_experts_against_dequantized(model, tokens: int = 4096) -> float:
    """Layer 0's 4-bit experts against stock MixtralExperts holding the same dequantized weights, on the GPU."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    quantized = model.model.layers[0].mlp.experts
    stock = MixtralExperts(model.config).to("cuda", torch.bfloat16)
    stock.gate_up_proj.data = quantized.gate_up_proj.dequantize(torch.bfloat16)
    stock.down_proj.data = quantized.down_proj.dequantize(torch.bfloat16)
    hidden = torch.randn(tokens, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    router_logits = torch.randn(tokens, model.config.num_local_experts, device="cuda")
    weights, index = router_logits.softmax(-1).topk(model.config.num_experts_per_tok, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)
    with torch.no_grad():
        ours, reference = quantized(hidden, index, weights), stock(hidden, index, weights)
    del stock
    return ((ours - reference).float().norm() / reference.float().norm()).item()


def train_step(model, seq: int, r: int = 16) -> dict:
    """One QLoRA step (LoRA r on attention and all experts, gradient checkpointing) at batch 1."""
    from peft import get_peft_model

    from finetune.moe import build_lora_config

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, build_lora_config(r=r, alpha=2 * r, dropout=0.0))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 32000, (1, seq), device="cuda")
    expert_b = {n: p for n, p in peft_model.named_parameters() if ".experts.lora_B.default." in n}
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    moved = sum(int((p.abs().sum(dim=(1, 2)) > 0).sum()) for p in expert_b.values())
    total = sum(p.shape[0] for p in expert_b.values())
    return {"seq": seq, "loss": loss.item(), "step_s": times[-1], "tokens_per_s": seq / times[-1],
            "peak_gib": torch.cuda.max_memory_allocated() / GIB, "trainable": sum(p.numel() for p in params),
            "expert_B_moved": f"{moved}/{total}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--quant", choices=["nf4", "fp4"], default="nf4")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--train-seq", type=int, default=1024, help="0 skips the training step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    model, report, resident, seconds = build(args.layers, args.quant, not args.no_double_quant)
    print(report.format())
    print(f"layers={args.layers} weights resident on GPU: {resident / GIB:.2f} GiB ({resident / 1e9:.2f} GB); "
          f"load peak {report.peak_bytes / GIB:.2f} GiB; built in {seconds:.1f} s")
    print(f"layer-0 experts vs dequantized reference: max rel error {check_experts_against_dequantized(model):.2e}")
    if args.train_seq:
        print("train step:", train_step(model, args.train_seq))


if __name__ == "__main__":
    main()
