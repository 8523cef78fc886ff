"""Live-tensor accounting: exact bytes for steps whose tensors can be counted by hand."""
import pytest
import torch
from torch import nn

from finetune.memory import LiveTensors, account_step


def test_views_count_once_and_freed_storages_leave_the_count():
    tracker = LiveTensors(torch.device("cpu"))
    with tracker:
        t = torch.empty(100)  # 400 bytes
        v = t.view(10, 10)
        assert tracker.live == 400
        u = torch.empty(50, dtype=torch.float64)
        assert tracker.live == 800
        del u
        assert tracker.live == 400
        del t, v
        assert tracker.live == 0
    assert tracker.peak == 800


def test_only_the_named_device_counts():
    tracker = LiveTensors(torch.device("cpu"))
    with tracker:
        elsewhere = torch.empty(1000, device="meta")
        here = torch.empty(10)
        assert tracker.live == 40 and elsewhere.numel() == 1000 and here.numel() == 10


def test_a_linear_step_is_accounted_to_the_byte():
    torch.manual_seed(0)
    model = nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16)  # made before the step: not counted
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).square().sum().backward()
    optimizer.step()  # creates the momentum buffer the accounted step starts with
    optimizer.zero_grad(set_to_none=True)

    step = account_step(model, lambda: model(x).square().sum(), optimizer)
    weight = 16 * 32 * 4
    assert (step.frozen, step.trainable, step.optimizer) == (0, weight, weight)
    # square saves its input, the linear output [8, 32]; the loss is one float32
    assert step.after_forward == 8 * 32 * 4 + 4
    assert step.gradients == weight
    assert step.before == 2 * weight
    assert step.peak >= step.before + step.after_forward
    assert step.peak_phase.startswith(("forward", "backward", "optimizer"))
    assert "GiB" in step.format()


def test_gradients_left_from_before_are_refused():
    model = nn.Linear(4, 4)
    model(torch.ones(1, 4)).sum().backward()
    with pytest.raises(ValueError, match="zero_grad"):
        account_step(model, lambda: model(torch.ones(1, 4)).sum(), torch.optim.SGD(model.parameters(), lr=1.0))


def test_a_4bit_weight_counts_with_its_scales_and_codebooks():
    from finetune.bench import _linear4bit

    torch.manual_seed(0)
    quantized = _linear4bit(torch.randn(64, 128), torch.float32, "cpu")  # NF4, double quantization
    head = nn.Linear(64, 1)
    model = nn.Sequential(quantized, head)
    state = quantized.weight.quant_state
    # 4 bits per weight; a uint8 scale per 64-block; the nested fp32 scales, both codebooks, the offset
    side = [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    expected = 64 * 128 // 2 + sum(t.numel() * t.element_size() for t in side)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    step = account_step(model, lambda: model(torch.randn(3, 128)).sum(), optimizer)
    assert step.frozen == expected
