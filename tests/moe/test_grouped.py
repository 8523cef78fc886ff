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


def _delta(seed: int, scaling: float = 2.0, dropout: nn.Module | None = None, device="cpu") -> ExpertLoraDelta:
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return (torch.randn(shape, generator=g) * 0.1).to(device).requires_grad_()

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
    grads = torch.autograd.grad((y.float() * torch.linspace(-1, 1, H, device=y.device)).square().sum(), [xx, *params])
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("unused_expert", [False, True])
def test_on_the_gpu_matches_the_reference_in_bfloat16(chunks, unused_expert):
    """CUDA's grouped matmul on the padded operands (LoRA columns and rows), with the Triton launches where they
    are on; with an expert that gets no token, a group of no rows (CUDA's weight gradient of an empty group has
    hung or returned garbage in some torch versions: it must be exactly 0)."""
    experts = _experts(torch.bfloat16, chunks=chunks).to("cuda")
    deltas = [_delta(2, device="cuda"), _delta(3, scaling=0.5, device="cuda")]
    x, index, weights = (t.to("cuda") for t in _routing(unused_expert=unused_expert))
    fast, ref = _run(experts, deltas, "grouped", x, index, weights), _run(experts, deltas, "reference", x, index, weights)
    for f, r in zip(fast, ref):
        assert _rel(f, r) < 3e-2
    if unused_expert:
        for grad in fast[2:]:
            assert torch.count_nonzero(grad[E - 1]) == 0


def test_without_adapters_equals_the_base_experts():
    experts = _experts(chunks=4)
    x, index, weights = _routing()
    fast, ref = _run(experts, [], "grouped", x, index, weights), _run(experts, [], "reference", x, index, weights)
    assert _rel(fast[0], ref[0]) < 1e-5 and _rel(fast[1], ref[1]) < 1e-5


def test_dropout_gradients_match_finite_differences():
    """With dropout the masks are random: check the backward against central differences under the same seed, for
    each parameter and the input separately. A second adapter without dropout beside it (its w2 share goes
    through the base matmul, the other's is masked)."""
    experts = _experts(chunks=2)
    dropout = nn.Dropout(0.3).train()
    deltas = [_delta(4, dropout=dropout), _delta(6, scaling=0.5)]
    x, index, weights = _routing()
    x = x.clone().requires_grad_()

    def loss(seed=0):
        torch.manual_seed(seed)
        return expert_forward(x, index, weights, experts, deltas, kernel="grouped").square().sum()

    params = [x, *(t for delta in deltas for t in (*delta.lora_A.values(), *delta.lora_B.values()))]
    grads = torch.autograd.grad(loss(), params)
    g = torch.Generator().manual_seed(5)
    eps = 1e-3
    for p, grad in zip(params, grads):
        d = torch.randn(p.shape, generator=g)
        with torch.no_grad():
            p.add_(eps * d)
            up = loss()
            p.sub_(2 * eps * d)
            down = loss()
            p.add_(eps * d)
        numeric, analytic = (up - down) / (2 * eps), (grad * d).sum()
        # central differences at this eps are off by ~1e-3 here (the eps^2 term); a mask that backward did not
        # reuse, or a missing 1 / (1 - p), would be off by O(1)
        assert abs(numeric - analytic) / abs(analytic) < 1e-2, (p.shape, numeric.item(), analytic.item())
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
    # an intermediate size of 96: its w2 rows are not whole 4-bit blocks; the reference loop takes it
    odd = QuantizedExperts(torch.randn(E, 2 * 96, H) * 0.05, torch.randn(E, H, 96) * 0.05, act_fn=nn.SiLU(),
                           compute_dtype=torch.float32)
    assert "intermediate size 96" in grouped_unsupported_reason(x, odd, [])
    fast, ref = _run(odd, [], "auto", x, index, weights), _run(odd, [], "reference", x, index, weights)
    assert all(torch.equal(f, r) for f, r in zip(fast, ref))


def test_chunks_cut_whole_blocks():
    experts = _experts()
    assert [chunk_count(experts, n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 2, 4, 4, 4]  # 256 = 4 x 64


def test_partial_dequantization_equals_slices_of_the_whole():
    experts = _experts()
    for stack in (experts.gate_up_proj, experts.down_proj):
        whole = stack.dequantize(torch.float32)
        scales = stack.block_scales()
        if stack is experts.gate_up_proj:
            expected = torch.cat([whole[:, 64:128], whole[:, I + 64 : I + 128]], 1)
            wider = torch.full((E, 128, H + 16), 7.0)  # padded rows: the dequantized values go beside other columns
            for out in (torch.empty(E, 128, H), wider[:, :, :H]):
                assert torch.equal(stack.dequantize_rows(scales, slice(64, 128), out, groups=2), expected)
            assert (wider[:, :, H:] == 7).all()
        else:
            part = stack.dequantize_part(scales, (H, 4), (slice(None), 1), (E, H, 64), torch.float32)
            assert torch.equal(part, whole[:, :, 64:128])
            wider = torch.full((E, H + 16, 64), 7.0)  # expert blocks spaced wider (rows below each)
            assert torch.equal(stack.dequantize_columns(scales, 1, 4, wider[:, :H]), whole[:, :, 64:128])
            assert (wider[:, H:] == 7).all()


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
    assert result.loss <= tol.loss and set(result.grads) == {"experts", "attention"}, result
    assert all(rel <= tol.grads for rel in result.grads.values()), result


def test_each_chunk_makes_only_its_share_of_the_dense_weights():
    """Every tensor one forward and backward makes, by live-tensor accounting: no dense weight beyond one chunk."""
    from finetune.memory import LiveTensors

    x, index, weights = _routing(tokens=8)
    # chunk c of the w1 and w3 rows of all experts, dense, each row followed by the adapter's B columns (2r)
    gate_up_weights = E * 2 * I * (H + 2 * R) * 4
    peaks = {}
    for chunks in (1, 2, 4):
        experts, deltas = _experts(chunks=chunks), [_delta(2)]
        tracker = LiveTensors(torch.device("cpu"))
        with tracker:
            _run(experts, deltas, "grouped", x, index, weights)
        # the largest thing made is one buffer that each expert's piece is dequantized into
        assert tracker.largest.nbytes == gate_up_weights // chunks, tracker.largest
        assert tracker.largest.what.startswith("empty "), tracker.largest
        peaks[chunks] = tracker.peak
    assert peaks[1] > peaks[2] > peaks[4]


def _swiglu_autograd(h, d_act, inter):
    leaf = h.clone().requires_grad_()
    act = torch.nn.functional.silu(leaf[:, :inter]) * leaf[:, inter:]
    act.backward(d_act)
    return act.detach(), leaf.grad


def test_swiglu_backward_without_triton_in_row_blocks_equals_autograd(monkeypatch):
    from finetune.moe import grouped

    monkeypatch.setattr(grouped, "_SWIGLU_BLOCK_ELEMENTS", 3 * 16)  # 3 rows a block: 4 blocks, the last partial
    g = torch.Generator().manual_seed(0)
    h, d_act = torch.randn(10, 32, generator=g), torch.randn(10, 16, generator=g)
    act, dh = _swiglu_autograd(h, d_act, 16)
    got_dh, got_act = grouped.EAGER_SWIGLU.backward(h, d_act, 16)
    assert torch.allclose(got_dh, dh, atol=1e-6) and torch.equal(got_act, act)
    assert torch.equal(grouped.EAGER_SWIGLU.forward(h, 16), act)


def test_swiglu_with_triton_equals_autograd(monkeypatch):
    """The fused passes a GPU runs, here by Triton's interpreter on CPU tensors."""
    pytest.importorskip("triton", reason="triton is a dev dependency (Linux x86_64)")
    from finetune.moe import grouped

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = grouped.make_triton_swiglu()
    g = torch.Generator().manual_seed(0)
    h, d_act = torch.randn(10, 2 * 1100, generator=g), torch.randn(10, 1100, generator=g)  # two column blocks
    act, dh = _swiglu_autograd(h, d_act, 1100)
    got_dh, got_act = kernels.backward(h, d_act, 1100)
    assert torch.allclose(got_dh, dh, atol=1e-6) and torch.allclose(got_act, act, atol=1e-6)
    assert torch.allclose(kernels.forward(h, 1100), act, atol=1e-6)


def test_the_fused_swiglu_refuses_widths_it_would_read_past(monkeypatch):
    """Compiled, the kernel reads rows of 2 * inter and inter values unchecked (the interpreter reads past a
    narrower tensor silently): other shapes are refused before the launch."""
    pytest.importorskip("triton", reason="triton is a dev dependency (Linux x86_64)")
    from finetune.moe import grouped

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = grouped.make_triton_swiglu()
    h = torch.randn(4, 2 * 16)
    kernels.backward(h, torch.randn(4, 16), 16)
    for call in (lambda: kernels.forward(h, 20), lambda: kernels.backward(h, torch.randn(2, 16), 16),
                 lambda: kernels.backward(h, torch.randn(4, 8), 16)):
        with pytest.raises(ValueError, match=r"expected \[gate \| up\]"):
            call()


def test_the_triton_kernels_have_names_a_gpu_profile_tells_apart(monkeypatch):
    """A GPU profile (`finetune bench --profile`) lists kernels by their function's name: two both called `kernel`
    would be one row."""
    pytest.importorskip("triton", reason="triton is a dev dependency (Linux x86_64)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled kernels, as a GPU runs them
    from triton.runtime.jit import JITFunction

    from finetune.moe import grouped
    from finetune.moe.dequant_kernel import make_strided_dequantizer

    swiglu = grouped.make_triton_swiglu()
    launchers = (make_strided_dequantizer(), swiglu.forward, swiglu.backward)
    names = [cell.cell_contents.__name__ for launch in launchers for cell in launch.__closure__
             if isinstance(cell.cell_contents, JITFunction)]
    assert names == ["dequantize_4bit_strided", "swiglu_fused", "swiglu_fused"]


def test_the_grouped_kernel_with_the_fused_swiglu_matches_eager(monkeypatch):
    """Forward and backward through the Triton passes a GPU runs (here by the interpreter): the same output and
    gradients as with eager torch, up to float32 rounding (the fused passes round each value once)."""
    pytest.importorskip("triton", reason="triton is a dev dependency (Linux x86_64)")
    from finetune.moe import grouped

    experts, deltas = _experts(chunks=2), [_delta(2)]
    x, index, weights = _routing(tokens=64)
    eager = _run(experts, deltas, "grouped", x, index, weights)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels, calls = grouped.make_triton_swiglu(), []

    def counted(fn):
        return lambda *a: calls.append(fn.__name__) or fn(*a)

    monkeypatch.setattr(grouped, "_swiglu_kernels", lambda _: grouped.SwigluKernels(counted(kernels.forward),
                                                                                     counted(kernels.backward)))
    fused = _run(experts, deltas, "grouped", x, index, weights)
    assert calls == ["forward", "forward", "backward", "backward"]  # 2 chunks
    for f, e in zip(fused, eager):
        assert _rel(f, e) < 1e-6


def test_the_environment_turns_the_fused_swiglu_off(monkeypatch):
    from finetune.moe import grouped

    h = torch.empty(2, 8)
    assert grouped._swiglu_kernels(h) is grouped.EAGER_SWIGLU  # a CPU tensor: eager torch either way
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(grouped, "_triton_swiglu", lambda: "fused")
    assert grouped._swiglu_kernels(h) == "fused"
    monkeypatch.setenv(grouped.FUSED_SWIGLU_ENV, "0")
    assert grouped._swiglu_kernels(h) is grouped.EAGER_SWIGLU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_on_the_gpu_the_fused_swiglu_matches_float32_autograd():
    """bfloat16 in and out; the fused passes round each value once, eager torch twice or more."""
    from finetune.moe import grouped

    kernels = grouped.make_triton_swiglu()
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(300, 2 * 1100, generator=g, device="cuda").bfloat16()
    d_act = torch.randn(300, 1100, generator=g, device="cuda").bfloat16()
    act, dh = _swiglu_autograd(h.float(), d_act.float(), 1100)
    got_dh, got_act = kernels.backward(h, d_act, 1100)
    got = kernels.forward(h, 1100)
    assert got.dtype == got_dh.dtype == got_act.dtype == torch.bfloat16
    assert torch.equal(got, got_act)
    assert _rel(got, act) < 4e-3 and _rel(got_dh, dh) < 4e-3
