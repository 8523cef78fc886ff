"""The one-launch strided dequantizer gives bitsandbytes' values bit for bit: run here by Triton's interpreter on
CPU tensors, and compiled on a GPU (marked)."""
import pytest
import torch
from torch import nn

from finetune.moe import grouped
from finetune.moe.dequant_kernel import SWITCH_ENV, make_strided_dequantizer, strided_dequantizer
from finetune.moe.quantized_experts import ExpertLoraDelta, QuantizedExperts, expert_forward
from finetune.syncs import HostSyncs

pytest.importorskip("triton", reason="triton is a dev dependency (Linux x86_64)")

# H = 128: two 4-bit blocks per row of w1/w3
E, H, I, R = 8, 128, 256, 8
QUANTIZATIONS = [("nf4", True), ("nf4", False), ("fp4", True)]


def _experts(quant_type="nf4", double_quant=True, device="cpu", dtype=torch.float32) -> QuantizedExperts:
    g = torch.Generator().manual_seed(0)
    return QuantizedExperts(torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05,
                            act_fn=nn.SiLU(), quant_type=quant_type, double_quant=double_quant,
                            compute_dtype=dtype).to(device)


@pytest.fixture
def interpreted(monkeypatch):
    """The launcher as Triton's interpreter runs it (NumPy on CPU tensors), in tiles of 1,024 rows (it runs each
    program in turn) and 32 columns: several column tiles per row, and row tiles the down stack does not fill."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return make_strided_dequantizer(tile_rows=1024, tile_cols=32)


def _same_pieces(experts, strided, dtype):
    # None would compare bitsandbytes' calls with themselves (FINETUNE_STRIDED_DEQUANT=0 turns `strided_dequantizer()`
    # off, and it is None without triton)
    assert strided is not None
    gate_up_scales, down_scales = experts.gate_up_proj.block_scales(), experts.down_proj.block_scales()
    for chunks in (1, 2, 4):
        c = I // chunks
        for chunk in range(chunks):
            # against bitsandbytes' dequantize: one call per expert and row group, into contiguous rows and into
            # rows padded as the grouped kernel's are (B columns after them)
            expected = grouped._dequantize_gate_up(experts, gate_up_scales, chunk, chunks,
                                                   torch.empty(E, 2 * c, H, dtype=dtype, device=experts.weight.device))
            for pad in (0, 2 * R):
                wide = torch.full((E, 2 * c, H + pad), 3.0, dtype=dtype, device=experts.weight.device)
                got = grouped._dequantize_gate_up(experts, gate_up_scales, chunk, chunks, wide[:, :, :H], strided)
                assert torch.equal(got, expected), (chunks, chunk, pad)
                assert (wide[:, :, H:] == 3).all()  # the padding is left alone
            # w2 columns against one call on gathered bytes (1 chunk: on the stack), alone and with an adapter's A2
            # rows below each expert's block (the backward's layout)
            expected = grouped._down_weights(experts, down_scales, chunk, chunks, dtype)
            a2 = torch.randn(E, R, I, generator=torch.Generator().manual_seed(chunk)).to(experts.weight.device, dtype)
            with_rows = grouped._down_weights(experts, down_scales, chunk, chunks, dtype, [a2], strided)
            assert torch.equal(with_rows[:, :H], expected), (chunks, chunk)
            assert torch.equal(with_rows[:, H:], a2[:, :, chunk * c : (chunk + 1) * c])
            if chunks > 1:
                got = grouped._down_weights(experts, down_scales, chunk, chunks, dtype, strided=strided)
                assert got.shape == expected.shape and got.dtype == dtype
                assert torch.equal(got, expected), (chunks, chunk)


@pytest.mark.parametrize("quant_type, double_quant", QUANTIZATIONS)
def test_every_chunk_of_both_stacks_is_bitsandbytes_dequantization(interpreted, quant_type, double_quant):
    # float32 only: the interpreter truncates float32 to bfloat16 where a GPU rounds to nearest (as torch does);
    # bfloat16 is the GPU test's
    _same_pieces(_experts(quant_type, double_quant), interpreted, torch.float32)


def test_a_launch_that_would_read_past_the_packed_stack_is_refused(interpreted):
    """Compiled, the kernel reads where it is told unchecked (a GPU faults or reads another tensor's bytes; the
    interpreter reads them silently): the launcher checks the range first."""
    experts = _experts()
    stack, scales = experts.gate_up_proj, experts.gate_up_proj.block_scales()
    c = I // 2
    out = torch.empty(E, 2, c, H)
    strides = (2 * I * H, I * H, H)
    interpreted(stack.data, scales, stack.code, out, c * H, strides, 64)  # the last chunk: in range
    for data, scale, base, launch_strides in [
        (stack.data, scales, 2 * c * H, strides),  # a chunk past the last
        (stack.data[:-1], scales, c * H, strides),  # the last byte missing
        (stack.data, scales[:-1], c * H, strides),  # the last scale missing
        (stack.data, scales, c * H, (2 * I * H, -I * H, H)),  # a negative stride
    ]:
        with pytest.raises(ValueError, match="are not all in the"):
            interpreted(data, scale, stack.code, out, base, launch_strides, 64)
    with pytest.raises(ValueError, match="different devices"):
        interpreted(stack.data, scales, stack.code, out.to("meta"), 0, strides, 64)


def _lora(generator) -> ExpertLoraDelta:
    def t(*shape):
        return (torch.randn(shape, generator=generator) * 0.1).requires_grad_()

    return ExpertLoraDelta({"w1": t(E, R, H), "w3": t(E, R, H), "w2": t(E, R, I)},
                           {"w1": t(E, I, R), "w3": t(E, I, R), "w2": t(E, H, R)}, 2.0, nn.Identity())


def test_the_grouped_kernel_with_it_is_bit_for_bit_the_same(interpreted, monkeypatch):
    """Forward and backward (which dequantizes every chunk again) with the launcher in place of bitsandbytes'
    calls: the same output and gradients, exactly."""
    experts = _experts()
    experts.dequant_chunks = 2
    g = torch.Generator().manual_seed(1)
    lora = _lora(g)
    x = torch.randn(64, H, generator=g)
    weights, index = torch.randn(64, E, generator=g).softmax(-1).topk(2, dim=-1)

    def run():
        xx = x.clone().requires_grad_()
        y = expert_forward(xx, index, weights, experts, [lora], kernel="grouped")
        params = [xx, *lora.lora_A.values(), *lora.lora_B.values()]
        return [y, *torch.autograd.grad(y.square().sum(), params)]

    expected = run()
    launches = []
    monkeypatch.setattr(grouped, "_strided_dequantizer", lambda _: lambda *a: launches.append(1) or interpreted(*a))
    got = run()
    assert len(launches) == 2 * 2 * 2  # forward and backward, 2 chunks, 2 stacks
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_it_takes_most_of_the_host_work_out_of_a_chunked_layer(monkeypatch):
    """Ops one layer's experts dispatch, forward and backward, 2 chunks: bitsandbytes' calls against the launcher
    (here one that writes nothing: the launch itself is no op of the dispatcher). On a CPU, bitsandbytes' path
    also copies each piece (a GPU writes in place): those copies are left out of its count."""
    experts = _experts()
    experts.dequant_chunks = 2
    g = torch.Generator().manual_seed(2)
    lora, x = _lora(g), torch.randn(256, H, generator=g)
    weights, index = torch.randn(256, E, generator=g).softmax(-1).topk(2, dim=-1)

    def dispatched() -> int:
        with HostSyncs("cpu") as syncs:
            expert_forward(x, index, weights, experts, [lora], kernel="grouped").sum().backward()
        return syncs.ops

    through_bitsandbytes = dispatched() - 2 * 2 * E * 2  # forward and backward, 2 chunks, E experts x 2 row groups
    monkeypatch.setattr(grouped, "_strided_dequantizer", lambda _: lambda *a: None)
    strided = dispatched()
    assert strided < 0.5 * through_bitsandbytes, (strided, through_bitsandbytes)


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv(SWITCH_ENV, "0")
    assert strided_dequantizer() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quant_type, double_quant", QUANTIZATIONS)
def test_compiled_on_the_gpu_it_is_bitsandbytes_dequantization(quant_type, double_quant):
    experts = _experts(quant_type, double_quant, "cuda", torch.bfloat16)
    _same_pieces(experts, strided_dequantizer(), torch.bfloat16)
    _same_pieces(experts, make_strided_dequantizer(tile_rows=8, tile_cols=64), torch.bfloat16)  # several column tiles
