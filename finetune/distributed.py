"""One recipe, any number of processes: which process this is, and the few places where processes must agree.

`accelerate launch` (or torchrun) starts one process per device and tells each its rank in the environment
(RANK, LOCAL_RANK, WORLD_SIZE). Every process loads its own 4-bit model on its own device and trains on its
share of each batch; only the main process writes the run folder (checkpoints are the trainer's, which saves
from the main process alone, plus each process's RNG state and, under DeepSpeed, each process's partition of the
optimizer state). The process group is accelerate's `PartialState`, the same one the trainer uses: gloo on CPU,
NCCL on CUDA.

Three ways to spread the work: data parallel (DDP: every process holds the whole 4-bit model); FSDP, `shard`:
every process keeps 1/N of every weight, the 4-bit expert stacks included, and gathers one decoder layer at a time
(ours, not accelerate's: accelerate only shards on an accelerator, and would not know the 4-bit stacks, so it runs
the same on CPU processes and on GPUs); or DeepSpeed ZeRO-3, which accelerate and the trainer drive (`deepspeed`
partitions every parameter, the uint8 stacks included, when the trainer starts; each MixtralSparseMoeBlock is one
"leaf", gathered whole as it starts in every process, whichever experts that process's tokens reach). On CPU
processes DeepSpeed runs over gloo (`start`).

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
SHARDED_ENV = "FINETUNE_FSDP"  # set by `start` for this process when the launch asked for FSDP
MOE_BLOCK = "MixtralSparseMoeBlock"  # what a ZeRO-3 launch must declare a leaf module


def refuse_unsupported_launch(environ: dict[str, str] | None = None) -> None:
    """Launch settings other than what is built and tested here are refused, naming the accelerate config key and
    what works instead: DeepSpeed other than ZeRO-3 with the MoE blocks as leaves, FSDP other than what `shard`
    does (FSDP2, each layer resharded after its forward)."""
    environ = os.environ if environ is None else environ
    problems = []
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        problems = _deepspeed_problems(environ)
        config = "accelerate_configs/zero3_qlora.yaml"
    elif environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        problems = _fsdp_problems(environ)
        config = "accelerate_configs/fsdp_qlora.yaml"
    if problems:
        raise FinetuneError("the accelerate config asks for settings this toolkit does not support: "
                            + "; ".join(problems) + f" (see {config})")


def _deepspeed_problems(environ) -> list[str]:
    problems = []
    if "ACCELERATE_DEEPSPEED_CONFIG_FILE" in environ:
        problems.append("deepspeed_config.deepspeed_config_file: a DeepSpeed JSON file is not supported; give "
                        "zero_stage and the other settings in the accelerate config itself (optimizer, scheduler, "
                        "precision and batch come from the recipe)")
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage != "3":
        problems.append(f"deepspeed_config.zero_stage is {stage}: only 3 is supported (stages 1 and 2 partition "
                        "only the optimizer state and gradients, which for LoRA are tiny: use multi_gpu.yaml)")
    for key, env in (("offload_param_device", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
                     ("offload_optimizer_device", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")):
        if environ.get(env, "none").lower() != "none":
            problems.append(f"deepspeed_config.{key} is {environ[env]}: only none is supported (untested here; "
                            "the LoRA optimizer state is a few hundred MB for Mixtral-8x7B)")
    zero_init = environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT")  # absent: accelerate turns it on for stage 3
    if (zero_init or "true").lower() != "false":
        problems.append(f"deepspeed_config.zero3_init_flag is {zero_init or 'unset (on for stage 3)'}: it must be "
                        "false (finetune builds the 4-bit model itself; ZeRO-3 partitions it when training starts)")
    leaves = environ.get("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", "")
    if MOE_BLOCK not in leaves.split(","):
        problems.append(f"deepspeed_config.deepspeed_moe_layer_cls_names is {leaves or 'unset'}: it must name "
                        f"{MOE_BLOCK}, so that ZeRO-3 gathers each MoE block (router, 4-bit stacks, expert LoRA) "
                        "whole as it starts, in every process alike whichever experts its tokens reach, rather "
                        "than one stack at a time as the block's code reads them")
    return problems


def _fsdp_problems(environ) -> list[str]:
    problems = []
    if environ.get("FSDP_VERSION", "1") != "2":
        problems.append(f"fsdp_config.fsdp_version is {environ.get('FSDP_VERSION', '1')}: only 2 (per-parameter "
                        "sharding, which shards the uint8 4-bit stacks as they are) is supported")
    if environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        problems.append("fsdp_config.fsdp_offload_params: true is not supported (the expert kernel reads the 4-bit "
                        "stacks on the GPU)")
    if environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "true":
        problems.append(f"fsdp_config.fsdp_reshard_after_forward is {environ['FSDP_RESHARD_AFTER_FORWARD']}: only "
                        "true is supported (a layer left gathered after a forward without gradients, such as DPO's "
                        "reference pass or evaluation, stays whole until the next backward: every layer at once)")
    if environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        problems.append("fsdp_config.fsdp_activation_checkpointing: true is not supported; the recipe's "
                        "stages.N.gradient_checkpointing decides, under every launcher")
    return problems


def refuse_unsupported_optimizers(stages) -> None:
    """bitsandbytes' 8-bit AdamW on parameters FSDP shards or DeepSpeed partitions is untested: refused before
    anything loads, naming the recipe key."""
    if not sharded():
        return
    keys = [f"stages.{index}.optimizer" for index, stage in enumerate(stages) if stage.optimizer == "adamw_8bit"]
    if keys:
        raise FinetuneError(f"{', '.join(keys)}: adamw_8bit under {launch()} is not supported (one process or data "
                            f"parallel only); use adamw there, or accelerate_configs/multi_gpu.yaml")


def refuse_unsupported_model(spec, device: str) -> None:
    """Model settings a DeepSpeed launch cannot honour, refused before anything loads, naming the recipe key."""
    if not zero3():
        return
    import torch

    if device == "cpu" and torch.cuda.is_available():
        raise FinetuneError("model.device: cpu under a DeepSpeed launch on a machine with a GPU: accelerate would "
                            "start DeepSpeed on the GPU; set model.device: cuda (or auto), or launch CPU processes "
                            "with accelerate_configs/cpu_ddp.yaml")
    if spec.compute_dtype == "float16":
        raise FinetuneError("model.compute_dtype: float16 under DeepSpeed is not supported: its loss scaling skips "
                            "steps by design, which the NaN guard would take for non-finite gradients; use bfloat16")
    quantized = spec.quantization
    if spec.compute_dtype == "bfloat16" and device != "cpu" and quantized is not None and not quantized.double_quant:
        raise FinetuneError("model.quantization.double_quant: false under DeepSpeed with bfloat16 is not supported: "
                            "DeepSpeed's bf16 mode casts every floating-point parameter to bf16, the float32 block "
                            "scales of the 4-bit experts included (with double_quant: true they are uint8)")


def start(device: str) -> None:
    """Join the launcher's process group (a no-op in a single process); the trainer reuses it.

    An FSDP launch is taken over here: `shard` applies FSDP2 to the model itself, and accelerate must not wrap
    it again, so the trainer's accelerator is not told (ACCELERATE_USE_FSDP is cleared for this process)."""
    refuse_unsupported_launch()
    os.environ.pop(SHARDED_ENV, None)  # only this launch decides, not an inherited environment
    if os.environ.pop("ACCELERATE_USE_FSDP", "").lower() == "true":
        os.environ[SHARDED_ENV] = "1"
    if world_size() == 1:
        return
    from accelerate import PartialState

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(local_rank())
    state = PartialState(cpu=cpu_state(device), backend=backend(device), timeout=WAIT_LIMIT)
    if is_main():
        mode = {"fsdp": "FSDP2 (4-bit model sharded)", "zero3": "DeepSpeed ZeRO-3 (4-bit model partitioned)"}.get(
            launch(), state.distributed_type.value)
        print(f"[distributed] {state.num_processes} processes, {mode} over {state.backend}; "
              "process 0 writes the run folder")


def cpu_state(device: str) -> bool:
    """Whether accelerate's state is told this process is a CPU one: not under DeepSpeed, which accelerate starts
    only for a process that is not "cpu" (on CPU processes it then runs over gloo, see `backend`)."""
    return device == "cpu" and not zero3()


def backend(device: str) -> str | None:
    """The process group's backend when accelerate would not choose it: gloo for DeepSpeed on CPU processes."""
    return "gloo" if device == "cpu" and zero3() else None


def fsdp() -> bool:
    """True when `shard` spreads the model over the processes (an FSDP launch of more than one, see `start`)."""
    return SHARDED_ENV in os.environ and world_size() > 1


def zero3() -> bool:
    """True under a DeepSpeed launch (ZeRO-3, the only stage `refuse_unsupported_launch` lets through)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def leave_zero3() -> None:
    """After the last stage of a DeepSpeed launch: the trainer's arguments told transformers that ZeRO-3 is on, so
    every later `from_pretrained` (the export's, in the main process alone) would partition the model it builds
    over processes that have finished, and wait for them forever. Training is over: tell it ZeRO-3 is off."""
    if zero3():
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def sharded() -> bool:
    """True when every process holds only part of the weights (FSDP or ZeRO-3): each takes part in every gather,
    the adapter export and the routing drift's forwards included."""
    return fsdp() or zero3()


def launch() -> str:
    """How this run spreads its work: one, ddp, fsdp or zero3 (recorded in each stage's manifest)."""
    return "zero3" if zero3() else "fsdp" if fsdp() else "ddp" if world_size() > 1 else "one"


def skip_frozen_sync(model) -> None:
    """Data parallel: DDP broadcasts every parameter from the main process when it wraps the model; the frozen ones
    (the 4-bit stacks, about 22 GB for Mixtral-8x7B, and the rest of the base) are the same in every process, which
    each loaded from the same checkpoint, so they are left out. The trainable LoRA weights are still broadcast."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)


def whole(tensor):
    """The whole of a sharded parameter or gradient, detached (a collective: every process calls it, in the same
    order): an FSDP DTensor's, or a ZeRO-3 parameter's (a copy; for a trained one its fp32 master weights, which
    DeepSpeed's bf16 mode keeps apart from the bf16 copy the model computes with); an unsharded tensor as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor()
    if hasattr(tensor, "ds_id"):  # partitioned by DeepSpeed ZeRO-3
        if tensor.requires_grad and getattr(tensor, "_z3_optimizer", None) is not None:
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(tensor)
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor.detach()


def local(tensor):
    """This process's part of a sharded tensor, without communication; an unsharded tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def place_like(full, param):
    """`full` (the same whole tensor in every process) cut the way `param` is sharded, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=local(param).device, dtype=param.dtype)
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def shard(model) -> None:
    """FSDP2 over the processes, in place: each decoder layer is one unit (its 4-bit stacks, attention and LoRA
    gathered for that layer's forward, released after it, gathered again for its backward), the rest
    (embeddings, final norm, head) the root's, kept whole through the step.

    Every parameter becomes a DTensor holding 1/N of it, the packed uint8 expert stacks included (FSDP2 gathers
    a mixed-dtype unit as bytes). Call it after the trainer is built (trl copies DPO's reference adapter first)
    and before it trains."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

    # the model's own device: without a mesh FSDP2 would pick the machine's accelerator, even for a CPU run
    mesh = init_device_mesh(local(next(model.parameters())).device.type, (world_size(),))
    for layer in [m for m in model.modules() if isinstance(m, MixtralDecoderLayer)]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # the root's weights are needed again at once
    report_held(model, f"FSDP2 over {world_size()} processes")


def report_held(model, how: str) -> None:
    """The main process prints its part of the 4-bit expert stacks and of all parameters."""
    from finetune.moe import QuantizedExperts

    experts = [p for m in model.modules() if isinstance(m, QuantizedExperts) for p in m.parameters()]
    if is_main():
        print(f"[distributed] {how}: this one holds {_mib(experts, _held)} of the {_mib(experts, _whole)} of "
              f"4-bit expert stacks, {_mib(model.parameters(), _held)} of the {_mib(model.parameters(), _whole)} of "
              "parameters")


def _held(tensor) -> int:
    """Elements of a parameter this process keeps: its FSDP shard, its ZeRO-3 partition, or all of it."""
    if hasattr(tensor, "ds_tensor") and not getattr(tensor, "ds_persist", False):
        return tensor.ds_tensor.numel()
    return local(tensor).numel()


def _whole(tensor) -> int:
    return getattr(tensor, "ds_numel", None) or tensor.numel()


def _mib(tensors, count) -> str:
    return f"{sum(count(t) * t.element_size() for t in tensors) / 2**20:.3f} MiB"


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
    """The main process runs the block first (filling a cache, building a file), the others after it.

    When the block fails in the main process (bad data, a missing model, Ctrl-C), the others exit quietly (code 2),
    so that its error is the one printed, rather than followed by each waiting process's broken-connection
    traceback from the barrier the main process never reached.
    """
    if not is_main():
        if any_process(False):
            raise SystemExit(2)  # the main process's error is printed by it (`finetune.cli`, exit code 2)
        yield
        return
    try:
        yield
    except (Exception, KeyboardInterrupt):  # not GeneratorExit: no collective while the generator is torn down
        try:
            any_process(True)
        except Exception:  # a process already gone: the main process's own error is the one to raise
            pass
        raise
    any_process(False)


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
