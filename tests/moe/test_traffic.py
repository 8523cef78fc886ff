"""The traffic count of one layer's grouped expert kernel, on meta tensors, against arithmetic."""
import pytest

from finetune.moe.traffic import expert_layer_traffic

E, H, I, T, K = 8, 256, 512, 96, 2
ROWS = T * K  # routed rows
BF16 = 2


def _dequantized_bytes(traffic) -> int:
    return traffic.by_op.get("strided dequantize (triton)", 0) + traffic.by_op.get("dequantize_4bit", 0)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_matmul_flops_and_dequantization_bytes_are_the_arithmetic(chunks):
    """The FLOPs of the matmuls the kernel dispatches; each stack dequantized once per pass, whatever the chunking
    (the bytes of a Triton launch are the stand-in's count of its output and inputs)."""
    forward, backward = expert_layer_traffic(E, H, I, 0, T, chunks)
    # three projections of every routed row; the backward's input gradients are as many FLOPs (frozen weights)
    assert forward.matmul_flops == backward.matmul_flops == 2 * ROWS * 3 * H * I
    # both stacks, once per pass: bf16 written, packed nibbles and float32 scales (one per 64 values) read
    stacks = E * 3 * H * I
    assert _dequantized_bytes(forward) == _dequantized_bytes(backward) == stacks * BF16 + stacks // 2 + stacks // 64 * 4
    # one launch per stack and chunk (1 chunk: w2 is one run, bitsandbytes' call) and one SwiGLU pass per chunk
    assert forward.launches == backward.launches == chunks + (chunks if chunks > 1 else 0) + chunks


def test_the_lora_adds_no_activation_wide_op_outside_the_matmuls():
    """Its products that add into a base product are extra columns or rows of that grouped matmul (w1/w3 in the
    forward, w2's input gradient in the backward), so outside the matmuls no op gains as many bytes as one
    [rows, I] activation: what the LoRA adds there is rank-r or [rows, H] wide. At the 8x7B widths."""
    hidden, inter, tokens = 4096, 14336, 4096
    base = expert_layer_traffic(E, hidden, inter, 0, tokens, 1)
    lora = expert_layer_traffic(E, hidden, inter, 16, tokens, 1)
    activation = tokens * K * inter * BF16
    for without, with_lora in zip(base, lora):
        added = {op: n - without.by_op.get(op, 0) for op, n in with_lora.by_op.items() if "dequantize" not in op}
        assert 0 < max(added.values()) < activation, added


def test_the_swiglu_is_one_fused_pass_each_way():
    """No eager SiLU or sigmoid on a GPU with triton: the forward's activation and the backward's dh (with the
    activation again, for the w2 LoRA gradient) come from the fused passes."""
    forward, backward = expert_layer_traffic(E, H, I, 16, T, 2)
    assert "swiglu forward (triton)" in forward.by_op and "swiglu backward (triton)" in backward.by_op
    eager = {"silu", "sigmoid", "silu_backward", "sigmoid_backward"}
    assert not eager & (forward.by_op.keys() | backward.by_op.keys())
