"""One process of tests/test_distributed.py::test_fsdp_sharded_step_equals_the_unsharded_step (run by torchrun).

Loads the tiny 4-bit Mixtral with LoRA twice: once whole, taking the step on the whole batch, and once sharded
over the processes by `finetune.distributed.shard`, each process taking the step on its half of the batch in two
micro-batches, the first without gradient reduction (as the trainer's gradient accumulation asks of FSDP). Writes what
it saw to OUT/rank<N>.json: losses, the worst relative difference of the LoRA gradients, whether the gradients
waited for the last micro-batch, whether the whole 4-bit tensors were released once sharded, and the bytes this
process holds.
"""

import gc
import json
import math
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model

from finetune import distributed
from finetune.moe import QuantizedExperts, build_lora_config, load_mixtral


def build(base: Path):
    model, _ = load_mixtral(base, quant="nf4", double_quant=True, compute_dtype=torch.float32, device="cpu")
    model.enable_input_require_grads()
    torch.manual_seed(0)
    peft_model = get_peft_model(model, build_lora_config(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: a random B gives every LoRA weight a gradient
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()  # checkpointing applies in training mode only
    return peft_model


def main(base: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, processes = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(0, 32000, (2 * processes, 24), generator=torch.Generator().manual_seed(2))
    mine = batch.chunk(processes)[rank]

    whole = build(base)
    reference = whole(input_ids=batch, labels=batch).loss
    reference.backward()
    expected = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    del whole
    gc.collect()

    model = build(base)
    stacks = [p for m in model.modules() if isinstance(m, QuantizedExperts) for p in m.parameters()]
    whole_bytes = sum(p.numel() * p.element_size() for p in stacks)
    before = [weakref.ref(p) for p in stacks]
    del stacks
    os.environ[distributed.SHARDED_ENV] = "true"
    distributed.shard(model)
    gc.collect()
    stacks = [p for m in model.modules() if isinstance(m, QuantizedExperts) for p in m.parameters()]

    first, last = mine.chunk(2)
    model.set_requires_gradient_sync(False)
    loss = model(input_ids=first, labels=first).loss / 2  # the mean over the step's two micro-batches
    loss.backward()
    model.set_requires_gradient_sync(True)
    deferred = all(p.grad is None for p in model.parameters())  # kept unreduced inside FSDP until the last
    last_loss = model(input_ids=last, labels=last).loss / 2
    last_loss.backward()
    step_loss = (loss + last_loss).detach()
    dist.all_reduce(step_loss)
    worst = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            got, want = distributed.whole(p.grad), expected[name]
            difference = ((got - want).abs().max() / want.abs().max()).item()
            worst = max(worst, difference if math.isfinite(difference) else math.inf)
    result = {
        "loss": step_loss.item() / processes,
        "gradients_waited_for_the_last_micro_batch": deferred,
        "reference_loss": reference.item(),
        "worst_gradient_difference": worst,
        "gradients": len(expected),
        "whole_stacks_released": all(ref() is None for ref in before),
        "expert_bytes_held": sum(distributed.local(p).untyped_storage().nbytes() for p in stacks),
        "expert_bytes_whole": whole_bytes,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # neither process leaves the group while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
