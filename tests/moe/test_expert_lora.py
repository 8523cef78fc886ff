import re

import pytest
import torch
from peft import get_peft_model

from finetune.moe.expert_lora import ExpertLoraLayer
from finetune.moe.loader import load_mixtral
from finetune.moe.lora_config import build_lora_config
from finetune.moe.report import trainable_report
from finetune.moe.tiny import TINY_MIXTRAL

EXPERT_PARAM = re.compile(r"layers\.(\d+)\.mlp\.experts\.(lora_[AB])\.default\.(w[123])$")


def _peft(path, quant="nf4", init=True, **kwargs):
    model, _ = load_mixtral(path, quant=quant, compute_dtype=torch.float32)
    config = build_lora_config(8, 16, 0.0, **kwargs)
    config.init_lora_weights = init
    return get_peft_model(model, config)


def _every_expert_routed(peft_model, tokens) -> None:
    with torch.no_grad():
        out = peft_model(tokens, output_router_logits=True)
    for logits in out.router_logits:
        assert logits.topk(2, -1).indices.unique().numel() == 8


@pytest.mark.parametrize("quant", ["nf4", None])
def test_one_step_trains_every_expert_of_every_layer(tiny_path, tokens, quant):
    pm = _peft(tiny_path, quant=quant)
    _every_expert_routed(pm, tokens)
    expert_params = {n: p for n, p in pm.named_parameters() if EXPERT_PARAM.search(n)}
    assert len(expert_params) == 2 * 2 * 3  # layers x (A, B) x (w1, w2, w3)
    before = {n: p.detach().clone() for n, p in expert_params.items()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    pm.train()
    pm(tokens, labels=tokens).loss.backward()
    opt.step()
    for name, p in expert_params.items():
        changed = [not torch.equal(p[e], before[name][e]) for e in range(8)]
        if ".lora_B." in name:  # B starts at 0, so step one moves B (A's gradient is B^T-weighted, i.e. 0)
            assert all(changed), (name, changed)
    report = trainable_report(pm)
    assert set(report.experts) == {"w1", "w2", "w3"} and all(len(v) == 8 and min(v) > 0 for v in report.experts.values())
    assert set(report.attention) == {"q_proj", "k_proj", "v_proj", "o_proj"} and report.other == {}


def test_with_random_init_both_a_and_b_of_every_expert_move(tiny_path, tokens):
    pm = _peft(tiny_path, init=False)
    expert_params = {n: p for n, p in pm.named_parameters() if EXPERT_PARAM.search(n)}
    before = {n: p.detach().clone() for n, p in expert_params.items()}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm(tokens, labels=tokens).loss.backward()
    opt.step()
    for name, p in expert_params.items():
        assert all(not torch.equal(p[e], before[name][e]) for e in range(8)), name


def test_router_full_is_trained_and_frozen_otherwise(tiny_path):
    full = trainable_report(_peft(tiny_path, router="full"))
    frozen = trainable_report(_peft(tiny_path, router="frozen"))
    assert full.router == 2 * 8 * TINY_MIXTRAL["hidden_size"] and frozen.router == 0


def test_ranks_per_group(tiny_path):
    pm = _peft(tiny_path, expert_r=4, expert_alpha=4)
    layer = pm.base_model.model.model.layers[0]
    assert isinstance(layer.mlp.experts, ExpertLoraLayer)
    assert layer.mlp.experts.r["default"] == 4 and layer.mlp.experts.scaling["default"] == 1.0
    assert layer.self_attn.q_proj.r["default"] == 8 and layer.self_attn.q_proj.scaling["default"] == 2.0
    inter = TINY_MIXTRAL["intermediate_size"]
    assert layer.mlp.experts.lora_A["default"]["w2"].shape == (8, 4, inter)
    assert layer.mlp.experts.lora_B["default"]["w1"].shape == (8, inter, 4)


def test_router_lora_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="router='lora' is not offered"):
        build_lora_config(8, 16, 0.0, router="lora")
    with pytest.raises(ValueError, match="router must be"):
        build_lora_config(8, 16, 0.0, router="ful")


def test_merge_is_refused(tiny_path):
    pm = _peft(tiny_path)
    with pytest.raises(NotImplementedError, match="save_adapter"):
        pm.base_model.model.model.layers[0].mlp.experts.merge()


def test_trl_style_reference_adapter(tiny_path, tokens):
    """What trl's DPOTrainer does with a PeftModel holding "default" and no ref_model."""
    model, _ = load_mixtral(tiny_path, compute_dtype=torch.float32)
    x = tokens[:, :32]
    with torch.no_grad():
        base = model(x).logits
    config = build_lora_config(8, 16, 0.0)
    config.init_lora_weights = False
    pm = get_peft_model(model, config)
    with torch.no_grad():
        policy = pm(x).logits
    assert not torch.allclose(policy, base, atol=1e-3)

    pm.add_adapter("ref", pm.peft_config["default"])
    params = dict(pm.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in params.items():
            if ".default." in name:
                params[name.replace(".default.", ".ref.")].copy_(p)
                copied += 1
    assert copied == sum(1 for n in params if ".ref." in n) > 0
    assert any(".experts.lora_A.ref.w1" in n for n in params)

    pm.set_adapter("ref")
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, policy, rtol=0, atol=0)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x).logits, base, rtol=1e-6, atol=1e-6)
    pm.set_adapter("default")
    assert all(p.requires_grad == (".default." in n) for n, p in pm.named_parameters() if "lora_" in n)
    with torch.no_grad():  # training "default" must not move "ref"
        for name, p in pm.named_parameters():
            if ".experts.lora_B.default." in name:
                p.add_(0.05)
        assert not torch.allclose(pm(x).logits, policy, atol=1e-4)
        pm.set_adapter("ref")
        torch.testing.assert_close(pm(x).logits, policy, rtol=0, atol=0)
