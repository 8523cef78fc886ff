"""One process of tests/test_distributed.py::test_zero3_step_with_idle_experts_equals_the_unsharded_step (torchrun).

The tiny 4-bit Mixtral with LoRA on attention and every expert, gradient checkpointing on, partitioned over the
processes by DeepSpeed ZeRO-3 with MixtralSparseMoeBlock declared a leaf module (what accelerate does for
zero3_qlora.yaml's `deepspeed_moe_layer_cls_names`) and every parameter partitioned (no persistence threshold).
Process 1 trains on 2 tokens, so in every layer at least half of the experts get none of its tokens, while
process 0 trains on 24. The step must complete in both processes (neither waits on a gather the other skipped) and
give each LoRA gradient of one unsharded process averaging the two losses. Writes what it saw to OUT/rank<N>.json.
"""

import json
import math
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero import GatheredParameters
from deepspeed.utils import safe_get_full_grad, set_z3_leaf_modules
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from finetune import distributed
from finetune.moe import QuantizedExperts
from finetune.telemetry import record_routing

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_worker import build  # noqa: E402  (the same model, LoRA and checkpointing as the FSDP worker's)

CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def main(base: Path, out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tokens = torch.randint(0, 32000, (1, 26), generator=torch.Generator().manual_seed(2))
    batches = [tokens[:, :24], tokens[:, 24:]]  # process 0: 24 tokens, process 1: 2

    whole = build(base)
    reference = [whole(input_ids=b, labels=b).loss for b in batches]
    (sum(reference) / len(reference)).backward()  # ZeRO-3 averages the processes' gradients
    expected = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    del whole

    model = build(base)
    set_z3_leaf_modules(model, [MixtralSparseMoeBlock])
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=0.0), config=CONFIG)
    mine = batches[rank]
    with record_routing(engine.module) as chosen:
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
    experts = engine.module.config.num_local_experts
    idle = [experts - len(torch.cat(layer).unique()) for layer in chosen]
    worst = 0.0
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            got, want = safe_get_full_grad(p), expected[name]
            difference = ((got - want).abs().max() / want.abs().max()).item()
            worst = max(worst, difference if math.isfinite(difference) else math.inf)
    stacks = [p for m in engine.module.modules() if isinstance(m, QuantizedExperts) for p in m.parameters()]
    # what the adapter export reads: the whole trained weights (DeepSpeed's fp32 masters), as gathered
    exported = True
    for p in trainable:
        master = distributed.whole(p)
        with GatheredParameters([p]):
            exported &= master.dtype == torch.float32 and torch.equal(master, p.detach())
    result = {
        "loss": loss.item(),
        "reference_loss": reference[rank].item(),
        "idle_experts_per_layer": idle,
        "worst_gradient_difference": worst,
        "gradients": len(expected),
        "export_reads_the_whole_weights": exported,
        "expert_elements_held": sum(p.ds_tensor.numel() for p in stacks),
        "expert_elements_whole": sum(p.ds_numel for p in stacks),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # neither process leaves the group while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
