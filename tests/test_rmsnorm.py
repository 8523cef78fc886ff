import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from finetune.rmsnorm import LeanRMSNorm, use_lean_rms_norms


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs a CUDA GPU")])]


def _pair(dtype, hidden=256, device="cpu"):
    torch.manual_seed(0)
    stock = MixtralRMSNorm(hidden, eps=1e-5).to(device, dtype)  # the weight in `dtype` too
    with torch.no_grad():
        stock.weight.copy_(torch.randn(hidden) * 0.1 + 1)
    stock.weight.requires_grad_(False)
    return stock, LeanRMSNorm(stock.weight, stock.variance_epsilon)


def _saved(module, x):
    """Output, input gradient and the tensors autograd kept between them."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    y.backward(grad)
    return y, x.grad, kept


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_dtype, hidden", [(torch.bfloat16, 256), (torch.bfloat16, 96), (torch.float32, 256)])
def test_output_and_gradient_are_the_stock_ones_bit_for_bit(weight_dtype, hidden, device):
    stock, lean = _pair(weight_dtype, hidden, device=device)
    x = (torch.randn(3, 50, hidden) * 3).to(device, torch.bfloat16)
    y_stock, dx_stock, _ = _saved(stock, x)
    y_lean, dx_lean, _ = _saved(lean, x)
    assert y_lean.dtype == y_stock.dtype and torch.equal(y_lean, y_stock)
    assert dx_lean.dtype == dx_stock.dtype == torch.bfloat16 and torch.equal(dx_lean, dx_stock)


@pytest.mark.parametrize("device", DEVICES)
def test_under_autocast_too(device):
    stock, lean = _pair(torch.bfloat16, device=device)
    x = torch.randn(2, 40, 256).to(device, torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        y_stock, dx_stock, _ = _saved(stock, x)
        y_lean, dx_lean, _ = _saved(lean, x)
    assert torch.equal(y_lean, y_stock) and torch.equal(dx_lean, dx_stock)


def test_it_keeps_the_bf16_input_not_a_float32_copy():
    stock, lean = _pair(torch.bfloat16)
    x = torch.randn(4, 64, 256, dtype=torch.bfloat16)
    _, _, kept_stock = _saved(stock, x)
    _, _, kept_lean = _saved(lean, x)

    def big_float32(kept):
        return [t for t in kept if t.dtype == torch.float32 and t.numel() == x.numel()]

    assert big_float32(kept_stock), "the stock norm should keep a float32 copy of its input (what this replaces)"
    assert big_float32(kept_lean) == []
    # what the lean norm keeps: the input itself, the frozen weight, one scale per row
    assert sum(t.numel() * t.element_size() for t in kept_lean) == x.numel() * 2 + 256 * 2 + 4 * 64 * 4


def test_a_trainable_weight_and_a_float32_input_take_the_stock_path():
    """float32: the stock norm keeps no copy (its cast returns the input), so there is nothing to save."""
    _, lean = _pair(torch.bfloat16)

    def last_op(x):
        return type(lean(x.requires_grad_()).grad_fn).__name__

    assert last_op(torch.randn(2, 8, 256, dtype=torch.bfloat16)) == "_RMSNormFunctionBackward"
    assert last_op(torch.randn(2, 8, 256)) == "MulBackward0"  # the stock graph's last op
    lean.weight.requires_grad_(True)
    x = torch.randn(2, 8, 256, dtype=torch.bfloat16)
    lean(x).float().sum().backward()
    assert lean.weight.grad is not None and lean.weight.grad.abs().sum() > 0


def test_in_a_bfloat16_model_the_loss_and_adapter_gradients_are_bit_for_bit_the_same():
    """Inside a model the norm's input has other uses (the residual); its gradient still comes out the same."""
    from finetune.bench import build_model, with_lora

    model = with_lora(build_model(tiny=True, device="cpu", dtype=torch.bfloat16), naive=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_lean, grads_lean = step()
    for name, norm in [(n, m) for n, m in model.named_modules() if isinstance(m, LeanRMSNorm)]:
        parent, _, attr = name.rpartition(".")
        stock = MixtralRMSNorm(norm.weight.shape[0], eps=norm.variance_epsilon)
        stock.weight = norm.weight
        setattr(model.get_submodule(parent), attr, stock)
    loss_stock, grads_stock = step()
    assert torch.equal(loss_lean, loss_stock) and len(grads_lean) > 0
    assert all(torch.equal(grads_lean[n], grads_stock[n]) for n in grads_stock)


def test_the_loader_puts_them_in_every_place_without_changing_the_state_dict():
    from transformers import MixtralConfig, MixtralForCausalLM

    from finetune.bench import build_model
    from finetune.moe.tiny import TINY_MIXTRAL

    model = build_model(tiny=True, device="cpu")
    layers = model.config.num_hidden_layers
    assert len([m for m in model.modules() if isinstance(m, LeanRMSNorm)]) == 2 * layers + 1
    assert not any(isinstance(m, MixtralRMSNorm) for m in model.modules())
    with torch.device("meta"):
        stock = MixtralForCausalLM(MixtralConfig(**TINY_MIXTRAL))
    norm_keys = {k for k in stock.state_dict() if "norm" in k}
    assert len(norm_keys) == 2 * layers + 1 and norm_keys <= set(model.state_dict())
    assert use_lean_rms_norms(model) == 0  # nothing left to replace
