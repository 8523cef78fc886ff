import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch
from bitsandbytes.optim import AdamW as BnbAdamW

from finetune.optimizers import AdamW8bit, trainer_optimizer


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs a CUDA GPU")])]


def _params(device="cpu"):
    g = torch.Generator().manual_seed(0)
    # one tensor big enough for 8-bit moments (bitsandbytes keeps float32 ones under 4096 elements), one small,
    # and one that gets no gradient
    return [torch.nn.Parameter(torch.randn(*shape, generator=g).to(device)) for shape in ((64, 128), (16, 8), (4, 4))]


def _train(optimizer_cls, steps=4, device="cpu"):
    params = _params(device)
    optimizer = optimizer_cls([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.999), eps=1e-8, optim_bits=8, is_paged=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params[:2]:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return params, optimizer


@pytest.mark.parametrize("device", DEVICES)
def test_the_same_updates_as_bitsandbytes_bit_for_bit(device):
    ours, optimizer = _train(AdamW8bit, device=device)
    theirs, _ = _train(BnbAdamW, device=device)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert optimizer.state[ours[0]]["state1"].dtype == torch.uint8  # 8-bit moments where bitsandbytes uses them
    assert optimizer.state[ours[1]]["state1"].dtype == torch.float32
    assert not optimizer.state[ours[2]]  # no gradient, no state
    assert not torch.equal(ours[0], _params(device)[0])  # it trained


def test_it_never_waits_for_the_device_after_a_tensor(monkeypatch):
    """bitsandbytes calls its `sync_gpu` (torch.cuda.synchronize on a GPU) after every tensor's update."""
    calls = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: calls.append(t.shape))
    _train(BnbAdamW, steps=2)
    assert len(calls) == 2 * 2  # two tensors with gradients, two steps
    calls.clear()
    _train(AdamW8bit, steps=2)
    assert calls == []


def test_the_trainer_gets_it_with_its_own_learning_rate_and_betas():
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", optim="adamw_bnb_8bit", learning_rate=3e-4, adam_beta2=0.95,
                             use_cpu=True, report_to="none")
    cls, kwargs = trainer_optimizer("adamw_8bit", args)
    assert cls is AdamW8bit
    assert kwargs["lr"] == 3e-4 and kwargs["betas"] == (0.9, 0.95) and kwargs["optim_bits"] == 8
    assert trainer_optimizer("adamw", args) is None


def test_a_sharded_launch_refuses_it_naming_the_key(monkeypatch):
    from finetune import distributed
    from finetune.errors import FinetuneError
    from finetune.recipe.schema import SFTStage

    stages = [SFTStage(type="sft", optimizer="adamw_8bit"), SFTStage(type="sft"),
              SFTStage(type="sft", optimizer="adamw_8bit")]
    distributed.refuse_unsupported_optimizers(stages)  # one process: fine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(FinetuneError, match=r"^stages\.0\.optimizer, stages\.2\.optimizer: adamw_8bit under zero3 "
                                            r"is not supported"):
        distributed.refuse_unsupported_optimizers(stages)
