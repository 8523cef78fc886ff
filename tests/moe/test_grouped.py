"""The grouped expert kernel against the reference loop: outputs, input gradients, every expert's LoRA gradients."""
import pytest
import torch
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from finetune.moe.grouped import chunk_count, grouped_unsupported_reason
from finetune.moe.quantized_experts import (KERNEL_ENV, ExpertLoraDelta, QuantizedExperts, StockExpertWeights,
                                            expert_forward, set_expert_kernel)

E, H, I, R = 8, 64, 256, 16


def _experts(dtype=torch.float32, chunks=None) -> QuantizedExperts:
    g = torch.Generator().manual_seed(0)
    q = QuantizedExperts(torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05,
                         act_fn=nn.SiLU(), compute_dtype=dtype)
    if chunks:
        q.dequant_chunks = chunks
    return q


def _delta(seed: int, scaling: float = 2.0, dropout: nn.Module | None = None) -> ExpertLoraDelta:
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return (torch.randn(shape, generator=g) * 0.1).requires_grad_()

    return ExpertLoraDelta({"w1": t(E, R, H), "w3": t(E, R, H), "w2": t(E, R, I)},
                           {"w1": t(E, I, R), "w3": t(E, I, R), "w2": t(E, H, R)}, scaling, dropout or nn.Identity())


def _routing(tokens=300, unused_expert=True):
    g = torch.Generator().manual_seed(1)
    pool = E - 1 if unused_expert else E  # the last expert gets no token: its gradients must be exactly 0
    index = torch.stack([torch.randperm(pool, generator=g)[:2] for _ in range(tokens)])
    return torch.randn(tokens, H, generator=g), index, torch.softmax(torch.randn(tokens, 2, generator=g), -1)


def _run(experts, deltas, kernel, x, index, weights):
    xx = x.clone().to(experts.compute_dtype).requires_grad_()
    params = [t for d in deltas for t in (*d.lora_A.values(), *d.lora_B.values())]
    y = expert_forward(xx, index, weights, experts, deltas, kernel=kernel)
    grads = torch.autograd.grad((y.float() * torch.linspace(-1, 1, H)).square().sum(), [xx, *params])
    return [y.detach(), *grads]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_matches_the_reference_in_float32(chunks):
    experts, deltas = _experts(chunks=chunks), [_delta(2), _delta(3, scaling=0.5)]  # two active adapters
    x, index, weights = _routing()
    fast, ref = _run(experts, deltas, "grouped", x, index, weights), _run(experts, deltas, "reference", x, index, weights)
    # same weights, float32: only the summation order differs (chunks of the intermediate dimension)
    for f, r in zip(fast, ref):
        assert _rel(f, r) < 1e-5
    for grad in fast[2:]:  # expert 7 received no token
        assert torch.count_nonzero(grad[E - 1]) == 0
        assert all(torch.count_nonzero(grad[e]) > 0 for e in range(E - 1))


def test_matches_the_reference_in_bfloat16():
    experts, deltas = _experts(torch.bfloat16, chunks=2), [_delta(2)]
    x, index, weights = _routing(unused_expert=False)
    fast, ref = _run(experts, deltas, "grouped", x, index, weights), _run(experts, deltas, "reference", x, index, weights)
    # bf16 products; the reference computes LoRA in fp32 and rounds once per expert: ~1e-2 measured
    for f, r in zip(fast, ref):
        assert _rel(f, r) < 3e-2


def test_without_adapters_equals_the_base_experts():
    experts = _experts(chunks=4)
    x, index, weights = _routing()
    fast, ref = _run(experts, [], "grouped", x, index, weights), _run(experts, [], "reference", x, index, weights)
    assert _rel(fast[0], ref[0]) < 1e-5 and _rel(fast[1], ref[1]) < 1e-5


def test_dropout_gradients_match_finite_differences():
    """With dropout the masks are random: check the backward against a central difference under the same seed."""
    experts = _experts(chunks=2)
    dropout = nn.Dropout(0.3).train()
    delta = _delta(4, dropout=dropout)
    x, index, weights = _routing()

    def loss(seed=0):
        torch.manual_seed(seed)
        return expert_forward(x, index, weights, experts, [delta], kernel="grouped").square().sum()

    params = [*delta.lora_A.values(), *delta.lora_B.values()]
    grads = torch.autograd.grad(loss(), params)
    g = torch.Generator().manual_seed(5)
    directions = [torch.randn(p.shape, generator=g) for p in params]
    eps = 1e-3
    with torch.no_grad():
        for p, d in zip(params, directions):
            p.add_(eps * d)
        up = loss()
        for p, d in zip(params, directions):
            p.sub_(2 * eps * d)
        down = loss()
        for p, d in zip(params, directions):
            p.add_(eps * d)
    numeric = (up - down) / (2 * eps)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, directions))
    # central differences at this eps are off by ~1.4e-3 here with or without dropout (the eps^2 term);
    # a mask that backward did not reuse would be off by O(1)
    assert abs(numeric - analytic) / abs(analytic) < 5e-3
    assert not torch.equal(loss(0), loss(1))  # the masks are in effect


def test_kernel_selection(monkeypatch):
    experts, delta = _experts(), _delta(2)
    x, index, weights = _routing()
    called = []
    import finetune.moe.grouped as grouped

    real = grouped.grouped_expert_forward
    monkeypatch.setattr(grouped, "grouped_expert_forward", lambda *a, **k: called.append(1) or real(*a, **k))
    expert_forward(x, index, weights, experts, [delta])
    assert called == [1]  # auto: grouped where supported
    monkeypatch.setenv(KERNEL_ENV, "reference")
    expert_forward(x, index, weights, experts, [delta])
    assert called == [1]
    assert set_expert_kernel(nn.Sequential(experts), "grouped") == 1
    expert_forward(x, index, weights, experts, [delta])  # the module's pin beats the environment
    assert called == [1, 1]
    monkeypatch.setenv(KERNEL_ENV, "fast")
    experts.kernel = "auto"
    with pytest.raises(ValueError, match="expert kernel must be one of"):
        expert_forward(x, index, weights, experts, [delta])


def test_unsupported_inputs_fall_back_or_refuse_when_forced():
    stock = StockExpertWeights(MixtralExperts(MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E)))
    x, index, weights = _routing()
    assert "QuantizedExperts" in grouped_unsupported_reason(x, stock, [])
    with pytest.raises(ValueError, match="grouped expert kernel unavailable"):
        expert_forward(x, index, weights, stock, [], kernel="grouped")
    odd_rank = ExpertLoraDelta({"w1": torch.zeros(E, 3, H)}, {}, 1.0, nn.Identity())
    assert "LoRA rank" in grouped_unsupported_reason(x, _experts(torch.bfloat16), [odd_rank])


def test_chunks_cut_whole_blocks():
    experts = _experts()
    assert [chunk_count(experts, n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 2, 4, 4, 4]  # 256 = 4 x 64


def test_partial_dequantization_equals_slices_of_the_whole():
    experts = _experts()
    for stack in (experts.gate_up_proj, experts.down_proj):
        whole = stack.dequantize(torch.float32)
        scales = stack.block_scales()
        if stack is experts.gate_up_proj:
            part = stack.dequantize_rows(scales, slice(64, 128), torch.float32, groups=2)
            assert torch.equal(part, torch.cat([whole[:, 64:128], whole[:, I + 64 : I + 128]], 1))
        else:
            part = stack.dequantize_part(scales, (H, 4), (slice(None), 1), (E, H, 64), torch.float32)
            assert torch.equal(part, whole[:, :, 64:128])


def test_whole_tiny_model_loss_and_gradients_match(tiny_path):
    from peft import get_peft_model

    from finetune.bench import TOLERANCE, check_model, fast_loss
    from finetune.moe.loader import load_mixtral
    from finetune.moe.lora_config import build_lora_config

    model, _ = load_mixtral(tiny_path, compute_dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, build_lora_config(r=16, alpha=32, dropout=0.0))
    result = check_model(peft_model, seq=128, loss_fn=fast_loss)
    tol = TOLERANCE[torch.float32]
    assert result.loss <= tol.loss and result.grads <= tol.grads, result


def test_each_chunk_makes_only_its_share_of_the_dense_weights():
    """Every tensor one forward and backward makes, by live-tensor accounting: no dense weight beyond one chunk."""
    from finetune.memory import LiveTensors

    x, index, weights = _routing(tokens=8)
    dense_gate_up = E * 2 * I * H * 4
    peaks = {}
    for chunks in (1, 2, 4):
        experts, deltas = _experts(chunks=chunks), [_delta(2)]
        tracker = LiveTensors(torch.device("cpu"))
        with tracker:
            _run(experts, deltas, "grouped", x, index, weights)
        # the largest thing made is chunk c of the w1 and w3 rows of all experts, dense
        assert tracker.largest.nbytes == dense_gate_up // chunks, tracker.largest
        # one chunk: a single dequantize call; more: one buffer that each expert's piece is dequantized into
        assert tracker.largest.what.startswith("dequantize_4bit" if chunks == 1 else "empty "), tracker.largest
        peaks[chunks] = tracker.peak
    assert peaks[1] > peaks[2] > peaks[4]


def test_swiglu_backward_without_triton_in_row_blocks_equals_autograd(monkeypatch):
    from finetune.moe import grouped

    monkeypatch.setattr(grouped, "_SWIGLU_BLOCK_ELEMENTS", 3 * 16)  # 3 rows a block: 4 blocks, the last partial
    g = torch.Generator().manual_seed(0)
    h, d_act = torch.randn(10, 32, generator=g), torch.randn(10, 16, generator=g)
    leaf = h.clone().requires_grad_()
    (torch.nn.functional.silu(leaf[:, :16]) * leaf[:, 16:]).backward(d_act)
    assert torch.allclose(grouped._swiglu_backward(h, d_act, 16, None), leaf.grad, atol=1e-6)


def test_swiglu_backward_with_triton_equals_autograd(monkeypatch):
    """The fused kernel a GPU runs, here by Triton's interpreter on CPU tensors."""
    pytest.importorskip("triton", reason="triton is a dev dependency (Linux x86_64)")
    from finetune.moe import grouped

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launch = grouped.make_triton_swiglu_backward()
    g = torch.Generator().manual_seed(0)
    h, d_act = torch.randn(10, 2 * 1100, generator=g), torch.randn(10, 1100, generator=g)  # two column blocks
    leaf = h.clone().requires_grad_()
    (torch.nn.functional.silu(leaf[:, :1100]) * leaf[:, 1100:]).backward(d_act)
    out = torch.empty_like(h)
    launch(h, d_act, out, 1100)
    assert torch.allclose(out, leaf.grad, atol=1e-6)
