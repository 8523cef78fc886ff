import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from finetune.moe.quantized_experts import QuantizedExperts

CONFIG = MixtralConfig(hidden_size=64, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)


def _stock_experts(gate_up: torch.Tensor, down: torch.Tensor) -> MixtralExperts:
    experts = MixtralExperts(CONFIG)
    experts.gate_up_proj.data, experts.down_proj.data = gate_up, down
    return experts


def _routing(tokens: int = 200):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 64, generator=g)
    index = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), -1)
    return x, index, weights


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_forward_and_backward_equal_the_dequantized_weights(quant_type, double_quant):
    gate_up, down = torch.randn(8, 256, 64) * 0.02, torch.randn(8, 64, 128) * 0.02
    q = QuantizedExperts(gate_up, down, act_fn=torch.nn.functional.silu, quant_type=quant_type,
                         double_quant=double_quant, compute_dtype=torch.float32)
    dense = _stock_experts(q.gate_up_proj.dequantize(torch.float32), q.down_proj.dequantize(torch.float32))
    x, index, weights = _routing()
    xq, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    yq, yd = q(xq, index, weights), dense(xd, index, weights)
    # same weights, same float32 ops: only summation order may differ (two slots per token), so ~1 ulp
    torch.testing.assert_close(yq, yd, rtol=1e-5, atol=1e-6)
    yq.square().sum().backward()
    yd.square().sum().backward()
    torch.testing.assert_close(xq.grad, xd.grad, rtol=1e-5, atol=1e-6)


def test_forward_close_to_the_unquantized_experts():
    gate_up, down = torch.randn(8, 256, 64) * 0.02, torch.randn(8, 64, 128) * 0.02
    q = QuantizedExperts(gate_up, down, act_fn=torch.nn.functional.silu, compute_dtype=torch.float32)
    x, index, weights = _routing()
    with torch.no_grad():
        y, y_ref = q(x, index, weights), _stock_experts(gate_up, down)(x, index, weights)
    # NF4 (16 levels, blocks of 64) puts ~10% relative RMS error on Gaussian weights; through two projections
    # the output error measures ~0.1-0.15 here. 0.25 catches a wrong layout (w1/w3 swap, transposes: error ~1.4).
    rel = (y - y_ref).norm() / y_ref.norm()
    assert rel < 0.25, rel
    assert torch.equal(q.gate_up_proj.dequantize_expert(3, torch.float32), q.gate_up_proj.dequantize(torch.float32)[3])


@pytest.mark.parametrize("double_quant", [True, False])  # block scales in uint8, or in float32
def test_holds_packed_4bit_frozen_and_out_of_the_state_dict(double_quant):
    q = QuantizedExperts(torch.randn(8, 256, 64), torch.randn(8, 64, 128), act_fn=torch.nn.functional.silu,
                         double_quant=double_quant)
    assert not any(p.requires_grad for p in q.parameters())
    # parameters so that FSDP shards them: the packed bytes and the block scales of both stacks
    assert sorted(n for n, _ in q.named_parameters()) == [
        "down_proj.absmax", "down_proj.data", "gate_up_proj.absmax", "gate_up_proj.data"]
    assert q.gate_up_proj.data.dtype == torch.uint8
    assert q.gate_up_proj.data.numel() == 8 * 256 * 64 // 2
    # rebuilt from the base checkpoint, never saved: neither a trainer checkpoint nor an adapter carries it
    assert q.state_dict() == {}
    assert q.load_state_dict({}).missing_keys == []
    before = q.gate_up_proj.dequantize(torch.float32)
    q.to(torch.bfloat16)  # a model-wide dtype cast leaves the packed bytes alone
    assert q.gate_up_proj.data.dtype == torch.uint8
    assert torch.equal(q.gate_up_proj.dequantize(torch.float32), before)
