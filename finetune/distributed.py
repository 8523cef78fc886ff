"""One recipe, any number of processes: which process this is, and the few places where processes must agree.

`accelerate launch` (or torchrun) starts one process per device and tells each its rank in the environment
(RANK, LOCAL_RANK, WORLD_SIZE). Every process loads its own 4-bit model on its own device and trains on its
share of each batch; only the main process writes the run folder (checkpoints are the trainer's, which
already saves from the main process alone, plus each process's RNG state). The process group is accelerate's
`PartialState`, the same one the trainer uses: gloo on CPU, NCCL on CUDA.

A recipe's global batch (`batch_size` x `grad_accum`) stays what it says whatever the number of processes:
each process accumulates grad_accum / processes micro-batches.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

from finetune.errors import FinetuneError


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# The other processes wait in a barrier while the main process downloads the base (about 90 GB for Mixtral-8x7B) or
# prepares the data; NCCL's default of 10 minutes would end the run.
WAIT_LIMIT = timedelta(hours=3)
UNSUPPORTED_LAUNCHERS = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
}


def refuse_sharded_launch(environ: dict[str, str] | None = None) -> None:
    """FSDP and DeepSpeed are refused, every ZeRO stage: FSDP and ZeRO-3 shard parameters, but the 4-bit expert
    stacks (about 95% of Mixtral's weights) are buffers, so each process would still hold them whole while the run
    looked sharded; ZeRO-1 and -2 have not been tried. Say what works instead."""
    environ = os.environ if environ is None else environ
    for variable, name in UNSUPPORTED_LAUNCHERS.items():
        if environ.get(variable, "").lower() == "true":
            raise FinetuneError(
                f"{name} launch ({variable}=true) is not supported yet: FSDP and DeepSpeed ZeRO-3 shard parameters, "
                "and the 4-bit expert stacks are buffers they would not shard, so every process would still hold the "
                "whole 4-bit model (DeepSpeed's ZeRO-1 and -2 have not been tried). "
                "Use data parallel instead (accelerate_configs/multi_gpu.yaml): each GPU holds the 4-bit model, "
                "about 23 GiB for Mixtral-8x7B")


def start(device: str) -> None:
    """Join the launcher's process group (a no-op in a single process); the trainer reuses it."""
    refuse_sharded_launch()
    if world_size() == 1:
        return
    from accelerate import PartialState

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(local_rank())
    state = PartialState(cpu=device == "cpu", timeout=WAIT_LIMIT)
    if is_main():
        print(f"[distributed] {state.num_processes} processes, {state.distributed_type.value} over "
              f"{state.backend}; process 0 writes the run folder")


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True in the process that writes files: rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_first():
    """The main process runs the block first (filling a cache, building a file), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def any_process(flag: bool) -> bool:
    """True everywhere when it is true in any process (SIGTERM may reach the processes a step apart)."""
    if not _group_ready():
        return flag
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_across_processes(tensors: list) -> None:
    """Add each tensor over all processes, in place (router statistics are counted per process), in one call."""
    if not _group_ready():
        return
    import torch
    import torch.distributed as dist

    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat)
    for tensor, total in zip(tensors, flat.split([tensor.numel() for tensor in tensors])):
        tensor.copy_(total.view_as(tensor))


def accumulation_per_process(stage_index: int, batch_size: int, grad_accum: int, processes: int) -> int:
    """The recipe's global batch, batch_size x grad_accum, split over the processes by dividing the accumulation."""
    if grad_accum % processes:
        raise FinetuneError(
            f"stages.{stage_index}.grad_accum: a global batch of {batch_size} x {grad_accum} cannot be split over "
            f"{processes} processes; make grad_accum a multiple of {processes} (each process then accumulates "
            f"grad_accum / {processes} micro-batches of {batch_size})")
    return grad_accum // processes
