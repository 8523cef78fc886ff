"""Real Mixtral-8x7B widths in 4-bit on a GPU (two layers; the full 32 is `python -m finetune.moe.full_shape`)."""

import pytest
import torch

from finetune.moe.full_shape import build, check_experts_against_dequantized, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# 8 experts x 3 projections x 14336 x 4096 weights per layer, 4 bits each plus the double-quantized scales
EXPERT_BYTES_PER_LAYER_NF4 = 8 * 3 * 14336 * 4096 * (0.5 + 1 / 64 / 256 * 4 + 1 / 64)


def test_two_full_width_layers_in_4bit_then_a_lora_step():
    model, report, resident, _ = build(layers=2, quant="nf4", double_quant=True)
    experts = report.parts["experts"]
    assert experts.quantized
    assert abs(experts.bytes / 2 - EXPERT_BYTES_PER_LAYER_NF4) / EXPERT_BYTES_PER_LAYER_NF4 < 0.01
    assert resident < 2 * 1.05 * EXPERT_BYTES_PER_LAYER_NF4 + 1.2e9  # + embeddings, head, attention
    one_layer_experts_bf16 = 8 * 3 * 14336 * 4096 * 2
    assert report.peak_bytes < resident + 1.1 * one_layer_experts_bf16  # streaming: never two layers in bf16
    assert check_experts_against_dequantized(model) < 2e-2  # bf16 rounding only: same weights, same routing
    step = train_step(model, seq=512)
    assert torch.isfinite(torch.tensor(step["loss"]))
    moved, total = map(int, step["expert_B_moved"].split("/"))
    assert total == 2 * 3 * 8 and moved == total, step
