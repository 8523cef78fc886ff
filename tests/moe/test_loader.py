import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from transformers import MixtralForCausalLM

from finetune.moe.dequantize import dequantized_state_dict
from finetune.moe.loader import load_mixtral
from finetune.moe.quantized_experts import QuantizedExperts
from finetune.moe.report import measure_parts


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unquantized_load_equals_stock_from_pretrained(tiny_path, tokens, dtype):
    ours, _ = load_mixtral(tiny_path, quant=None, compute_dtype=dtype)
    stock = MixtralForCausalLM.from_pretrained(tiny_path, dtype=dtype).eval()
    assert torch.equal(_logits(ours, tokens[:, :32]), _logits(stock, tokens[:, :32]))


def test_tied_embeddings(tied_tiny_path, tokens):
    ours, _ = load_mixtral(tied_tiny_path, quant="nf4", compute_dtype=torch.float32)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    stock = MixtralForCausalLM(ours.config)
    stock.load_state_dict(dequantized_state_dict(ours))
    torch.testing.assert_close(_logits(ours, tokens[:, :32]), _logits(stock.eval(), tokens[:, :32]), rtol=1e-5, atol=1e-5)


def test_quantized_load_equals_stock_with_the_dequantized_weights(tiny_path, tokens):
    ours, _ = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.float32)
    assert all(isinstance(layer.mlp.experts, QuantizedExperts) for layer in ours.model.layers)
    assert all(isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit) for layer in ours.model.layers)
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # really quantized on CPU
    stock = MixtralForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    original = _logits(stock, tokens[:, :32])
    stock.load_state_dict(dequantized_state_dict(ours))
    # identical weights and float32 ops: differences are summation order only
    torch.testing.assert_close(_logits(ours, tokens[:, :32]), _logits(stock, tokens[:, :32]), rtol=1e-5, atol=1e-5)
    # and the 4-bit model is still the same model: a random network amplifies NF4's ~10% weight error to about
    # 0.5 relative logit error over two layers, while a model with other weights (another seed) differs by ~1.4
    error = (_logits(ours, tokens[:, :32]) - original).abs().mean() / original.abs().mean()
    assert error < 0.7


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_report_counts_the_actual_tensors(tiny_path):
    model, report = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.bfloat16)
    experts = _bytes(t for layer in model.model.layers for t in (*layer.mlp.experts.parameters(), *layer.mlp.experts.buffers()))
    attention = 0
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            qs = proj.weight.quant_state
            attention += _bytes([proj.weight, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code])
    router = _bytes(layer.mlp.gate.weight for layer in model.model.layers)
    assert report.parts["experts"].bytes == experts and report.parts["experts"].quantized
    assert report.parts["attention"].bytes == attention and report.parts["attention"].quantized
    assert report.parts["router"].bytes == router and not report.parts["router"].quantized
    assert report.parts["embeddings"].bytes == _bytes([model.model.embed_tokens.weight])
    assert report.parts["lm_head"].bytes == _bytes([model.lm_head.weight])
    assert report.total_bytes == sum(p.bytes for p in report.parts.values())
    assert report.peak_bytes >= report.total_bytes
    assert "experts" in report.format()

    plain, plain_report = load_mixtral(tiny_path, quant=None, compute_dtype=torch.bfloat16)
    assert plain_report.total_bytes == _bytes([*plain.parameters(), *plain.buffers()])
    assert plain_report.parts["experts"].bytes == _bytes(p for layer in plain.model.layers for p in layer.mlp.experts.parameters())
    # 4-bit with double quant: ~0.52 bytes per weight versus 2 in bf16
    assert report.parts["experts"].bytes < 0.3 * plain_report.parts["experts"].bytes
    assert measure_parts(model) == report.parts


def test_streaming_peak_stays_near_quantized_size(tiny_path):
    _, report = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.bfloat16)
    _, plain = load_mixtral(tiny_path, quant=None, compute_dtype=torch.bfloat16)
    one_layer_experts_bf16 = plain.parts["experts"].bytes // 2
    # peak = quantized model + one layer's experts in bf16 (filled in place), never the whole bf16 model
    assert report.peak_bytes <= report.total_bytes + one_layer_experts_bf16 + 2**16


def test_loading_shows_a_progress_bar_over_layers_on_stderr(tiny_path, capsys):
    load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.float32)
    out, err = capsys.readouterr()
    assert "[model] loading, quantizing to nf4: 100%" in err and "2/2 [" in err and "layer/s]" in err
    assert "[model]" not in out
    # TQDM_DISABLE=1 (read by tqdm when it is imported) turns the bars off for a log that wants none
    quiet = subprocess.run([sys.executable, "-c", f"from finetune.moe.loader import load_mixtral; "
                            f"load_mixtral({str(tiny_path)!r})"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TQDM_DISABLE": "1"})
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "[model] loading" not in quiet.stderr
