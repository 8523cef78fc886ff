import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import MixtralForCausalLM

from finetune.moe.adapter_io import load_adapter, save_adapter
from finetune.moe.dequantize import dequantized_state_dict
from finetune.moe.loader import load_mixtral
from finetune.moe.lora_config import build_lora_config


def _trained_like(path, **kwargs):
    """Our 4-bit model with a non-trivial adapter (random A and B; router perturbed when trained)."""
    model, _ = load_mixtral(path, quant="nf4", compute_dtype=torch.float32)
    model.dense_state = dequantized_state_dict(model)  # the base's weights as a stock model holds them
    config = build_lora_config(8, 16, 0.0, **kwargs)
    config.init_lora_weights = False
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return pm.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("kwargs", [
    dict(router="full", expert_r=4, expert_alpha=8),
    dict(use_rslora=True, expert_r=16, expert_alpha=4),
    dict(attention=False),
])
def test_stock_peft_on_stock_mixtral_reproduces_our_logits(tiny_path, tokens, tmp_path, kwargs):
    pm = _trained_like(tiny_path, **kwargs)
    x = tokens[:, :32]
    ours = _logits(pm, x)
    save_adapter(pm, tmp_path)

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.block_sparse_moe.experts.7.w2.lora_B.weight" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is False

    stock = MixtralForCausalLM(pm.base_model.model.config)
    stock.load_state_dict(pm.base_model.model.dense_state)
    stock_peft = PeftModel.from_pretrained(stock.eval(), str(tmp_path))
    # same base weights (dequantized) and same float32 math: only summation order differs
    torch.testing.assert_close(_logits(stock_peft, x), ours, rtol=1e-5, atol=1e-5)


def test_round_trip_into_our_model_is_exact(tiny_path, tokens, tmp_path):
    pm = _trained_like(tiny_path, router="full", expert_r=4)
    x = tokens[:, :32]
    save_adapter(pm, tmp_path)
    fresh, _ = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.float32)
    loaded = load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(loaded.eval(), x), _logits(pm, x))
    assert all(p.requires_grad for n, p in loaded.named_parameters() if ".default." in n)
    original = dict(pm.named_parameters())
    for name, p in loaded.named_parameters():
        if ".default." in name:
            assert torch.equal(p, original[name]), name


def test_load_beside_an_existing_adapter_frozen(tiny_path, tokens, tmp_path):
    """DPO from an SFT adapter: the SFT adapter enters as a second, frozen adapter and can be switched to."""
    sft = _trained_like(tiny_path)
    save_adapter(sft, tmp_path)
    model, _ = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.float32)
    pm = get_peft_model(model, build_lora_config(8, 16, 0.0))
    pm = load_adapter(pm, tmp_path, adapter_name="sft", is_trainable=False)
    assert pm.active_adapter == "default"
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".sft." in n)
    pm.set_adapter("sft")
    assert torch.equal(_logits(pm.eval(), tokens[:, :32]), _logits(sft, tokens[:, :32]))


def test_missing_tensors_are_reported(tiny_path, tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(_trained_like(tiny_path), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors.pop("base_model.model.model.layers.0.block_sparse_moe.experts.3.w3.lora_A.weight")
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model, _ = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="missing 1 tensors"):
        load_adapter(model, tmp_path)
