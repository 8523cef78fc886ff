"""Checkpointed layer inputs moved off the device between forward and backward: same gradients, less memory."""
import pytest
import torch

from finetune import bench
from finetune.memory import account_step
from finetune.moe.loss import causal_lm_loss
from finetune.offload import OffloadedActivations, offload_during_forward

SEQ = 64


@pytest.fixture(scope="module")
def model():
    return bench.with_lora(bench.build_model(tiny=True, device="cpu"), naive=False)


def _loss(model, ids, offload: bool = False):
    """The loss, and with `offload` the hooks that ran the decoder inside `OffloadedActivations` (removed)."""
    hooks = offload_during_forward(model.get_base_model().model, ids.device.type, log=None) if offload else None
    try:
        return causal_lm_loss(model, ids, ids), hooks
    finally:
        if hooks is not None:
            hooks.remove()


def _step(model, ids, offload: bool):
    model.zero_grad(set_to_none=True)
    loss, hooks = _loss(model, ids, offload)
    loss.backward()  # after the forward's block: the saved tensors keep their hooks
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, hooks


def test_same_loss_and_gradients_with_the_layer_inputs_on_the_host(model):
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    layer_input = SEQ * model.config.hidden_size * 4  # float32 on CPU
    loss, grads, _ = _step(model, ids, False)
    loss_offloaded, grads_offloaded, offload = _step(model, ids, True)
    assert torch.equal(loss, loss_offloaded)
    assert grads.keys() == grads_offloaded.keys() and len(grads) > 0
    assert all(torch.equal(grads[n], grads_offloaded[n]) for n in grads)
    # the checkpoints' layer inputs and the final norm's input; not layer 0's input, the embedding output that
    # peft makes a leaf requiring grad: autograd holds it anyway
    assert offload.offloaded_bytes == model.config.num_hidden_layers * layer_input


def test_the_device_holds_less_between_forward_and_backward(model):
    ids = torch.randint(0, model.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    layer_input = SEQ * model.config.hidden_size * 4
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model.zero_grad(set_to_none=True)
    kept = account_step(model, lambda: _loss(model, ids)[0], optimizer)
    hooks = []

    def offloaded_loss():
        loss, offload = _loss(model, ids, True)
        hooks.append(offload)
        return loss

    shed = account_step(model, offloaded_loss, optimizer)
    offload = hooks[-1]
    # what the forward left on the device shrank by exactly what went to the host
    assert offload.offloaded_bytes == model.config.num_hidden_layers * layer_input
    assert kept.after_forward - shed.after_forward == offload.offloaded_bytes


def test_what_a_copy_would_not_free_stays_on_the_device():
    g = torch.Generator().manual_seed(0)
    w0, leaf0 = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)

    def grads(offload):
        w, leaf = torch.nn.Parameter(w0.clone()), leaf0.clone().requires_grad_()
        with offload:
            loss = (leaf @ w).sum()  # saves a parameter and a leaf that requires grad: both stay
            h = leaf * 2
            loss = loss + (h[:128] @ w).sum()  # saves a view of half of h's storage: stays
            stayed = offload.offloaded_bytes
            loss = loss + (h @ w).sum()  # saves h, all of its storage, made by autograd: goes
        loss.backward()
        return w.grad, leaf.grad, stayed, h.numel() * h.element_size()

    offload = OffloadedActivations(min_bytes=1, device_types=("cpu",))
    *offloaded, stayed, h_bytes = grads(offload)
    *kept, _, _ = grads(OffloadedActivations(min_bytes=2**40, device_types=("cpu",)))
    assert stayed == 0 and offload.offloaded_bytes == h_bytes
    assert all(torch.equal(a, b) for a, b in zip(offloaded, kept))


def test_small_tensors_and_other_devices_stay():
    x = torch.randn(4, 4, requires_grad=True)
    small = OffloadedActivations(min_bytes=1024, device_types=("cpu",))
    with small:
        y = x * 3  # 64 bytes
        (y * y).sum().backward()
    other_device = OffloadedActivations()  # CUDA only
    with other_device:
        big = torch.randn(1024, 1024, requires_grad=True) * 2  # 4 MiB, made by autograd, on CPU
        (big * big).sum().backward()
    assert small.offloaded_bytes == 0 and other_device.offloaded_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_layer_inputs_leave_the_device_and_come_back_exact():
    model = bench.with_lora(bench.build_model(tiny=False, device="cuda", layers=2), naive=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    layer_input = 2048 * model.config.hidden_size * 2  # bf16
    loss, grads, _ = _step(model, ids, False)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    kept, _ = _loss(model, ids)
    torch.cuda.synchronize()
    kept_bytes = torch.cuda.memory_allocated() - before
    del kept
    shed, offload = _loss(model, ids, True)
    torch.cuda.synchronize()
    assert kept_bytes - (torch.cuda.memory_allocated() - before) >= offload.offloaded_bytes >= layer_input
    shed.backward()
    assert torch.equal(loss, shed.detach())  # the forward reads the same values
    # the flash-attention backward accumulates with atomics: not bit-for-bit from run to run, offloaded or not
    assert all(torch.allclose(grads[n], p.grad, rtol=2e-2, atol=1e-6) for n, p in model.named_parameters() if n in grads)
