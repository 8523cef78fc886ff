"""What the SFT and DPO stages share: trainer arguments from the recipe, the metrics log, the stage manifest."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from finetune import distributed
from finetune.errors import FinetuneError
from finetune.recipe.schema import ONE_STEP_AT_RATE_ZERO, Recipe, Training, zero_rate_warmup

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


def trainer_kwargs(recipe: Recipe, stage: Training, stage_dir: Path, has_eval: bool, device: str) -> dict[str, Any]:
    """Keyword arguments shared by trl's SFTConfig and DPOConfig, all taken from the recipe."""
    eval_steps = stage.eval_steps if has_eval else None
    return dict(
        output_dir=str(stage_dir / "checkpoints"),
        seed=recipe.seed,
        data_seed=recipe.seed,
        learning_rate=stage.learning_rate,
        lr_scheduler_type=stage.lr_scheduler,
        warmup_steps=stage.warmup_ratio,  # a float below 1 is a ratio of the total steps in transformers 5
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps or -1,
        per_device_train_batch_size=stage.batch_size,
        per_device_eval_batch_size=stage.batch_size,
        # the recipe's batch is global: split over the processes (`finetune run` checked that it divides)
        gradient_accumulation_steps=stage.grad_accum // distributed.world_size(),
        # every LoRA weight takes part in every forward (each expert's A/B are slices of one stacked tensor), so
        # DDP need not search the graph for unused parameters; the 4-bit codebooks (buffers) are the same in every
        # process by construction and need no broadcast at every step (see also `distributed.skip_frozen_sync`)
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        # adamw: the trainer's default (torch's fused AdamW on a GPU); adamw_8bit: `finetune.optimizers.AdamW8bit`,
        # set by `use_recipe_optimizer`
        **({"optim": "adamw_bnb_8bit"} if stage.optimizer == "adamw_8bit" else {}),
        activation_checkpointing=stage.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if stage.gradient_checkpointing else None,
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_total_limit=stage.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        report_to="none",  # the dashboards are fed by finetune.tracking (see stage_callbacks), not the trainer
        run_name=recipe.tracking.run_name,
        bf16=recipe.model.compute_dtype == "bfloat16" and device != "cpu",
        fp16=recipe.model.compute_dtype == "float16",
        use_cpu=distributed.cpu_state(device),
        ddp_backend=distributed.backend(device),
        max_length=recipe.data.max_seq_len,
        router_aux_loss_coef=stage.router_aux_loss_coef,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


def stage_callbacks(recipe: Recipe, stage: Training, stage_dir: Path, dashboards) -> list[TrainerCallback]:
    """The trainer logs to the stage's dashboards, and the router telemetry (when on) every N steps."""
    from finetune.telemetry import RouterTelemetry
    from finetune.tracking import DashboardLog

    callbacks = [DashboardLog(dashboards)]
    if recipe.tracking.router_stats:
        every = recipe.tracking.router_stats_steps or stage.logging_steps
        callbacks.append(RouterTelemetry(every, stage_dir, dashboards))
    return callbacks


def optimizer_steps(stage: Training, rows: int, processes: int) -> int:
    """The trainer's step count for a stage of `rows` training rows (transformers' `set_initial_training_values`):
    max_steps, or the epochs over each process's micro-batches, grad_accum / processes of them a step."""
    if stage.max_steps:
        return stage.max_steps
    batches = math.ceil(rows / (stage.batch_size * processes))
    per_epoch = max(math.ceil(batches / (stage.grad_accum // processes)), 1)
    return math.ceil(stage.epochs * per_epoch)


def refuse_a_step_at_rate_zero(index: int, stage: Training, rows: int, processes: int) -> None:
    """A stage whose epochs come to one optimizer step would take it at learning rate 0 with any warmup (the recipe
    check catches `max_steps: 1`; the step count from epochs needs the data)."""
    if optimizer_steps(stage, rows, processes) == 1 and zero_rate_warmup(stage.warmup_ratio, stage.lr_scheduler):
        steps = (f"stages.{index} ({stage.type}): {rows} training rows in global batches of {stage.batch_size} x "
                 f"{stage.grad_accum} for {stage.epochs} epochs come to 1 optimizer step")
        raise FinetuneError(ONE_STEP_AT_RATE_ZERO.format(steps=steps, ratio=stage.warmup_ratio))


class MetricsLog(TrainerCallback):
    """Appends every logged value to metrics.jsonl in the stage folder, one JSON object per log call."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_begin(self, args, state, control, **kwargs):
        from finetune.telemetry import keep_records_up_to

        if state.is_world_process_zero:
            keep_records_up_to(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def write_manifest(stage_dir: Path, **fields: Any) -> None:
    """The stage's hand-off to the next one: what it trained from, with what, and what it produced."""
    manifest = {**fields, "complete": True, "versions": {name: version(name) for name in LIBRARIES}}
    tmp = stage_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(stage_dir / "manifest.json")


def read_manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text(encoding="utf-8"))


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class StopRequested(FinetuneError):
    """SIGTERM arrived: a checkpoint was saved and the run stopped before anything after this stage."""


class NonFiniteTraining(FinetuneError):
    """The loss or the gradients became NaN or inf; the optimizer step was not taken."""


class StopSignal:
    """Turns SIGTERM into a flag that training checks between steps; installed for the whole run."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopSignal:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def check(self, where: str) -> None:
        """Stop here if SIGTERM arrived in any process; every process of the run must call it at the same point."""
        if distributed.any_process(self.requested):
            raise StopRequested(f"stopped by SIGTERM {where}; resume with --resume")


class TrainingGuard(TrainerCallback):
    """Stops at the end of a step with a checkpoint when SIGTERM arrived, and refuses non-finite gradients
    before the optimizer step, so the last checkpoint and the weights stay usable."""

    def __init__(self, stop: StopSignal, stage: str):
        self.stop = stop
        self.stage = stage
        # FINETUNE_TRACE_STEPS=1 prints each micro-step: how the crash tests know where a kill lands
        self.trace = os.environ.get("FINETUNE_TRACE_STEPS") == "1"

    def on_substep_end(self, args, state, control, **kwargs):
        if self.trace:
            print(f"[trace] {self.stage} micro-step inside step {state.global_step + 1}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trace:
            print(f"[trace] {self.stage} step {state.global_step} done", flush=True)
        # every process gets the same answer, so all stop at the same step; the flag is only ever set, never written
        # back, as SIGTERM may arrive while the flags are being compared (it is then seen at the next step)
        if distributed.any_process(self.stop.requested):
            self.stop.requested = True
            control.should_save = True
            control.should_training_stop = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if distributed.zero3():  # DeepSpeed has taken or skipped the step already, inside the backward: see ZeroTrainer
            return
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        # a sharded run checks each process's part of the gradients, then agrees (the parts differ)
        refuse_non_finite([(n, distributed.local(p.grad)) for n, p in params], state.global_step + 1,
                          Path(args.output_dir), agree=distributed.fsdp())


def refuse_non_finite(grads: list[tuple[str, torch.Tensor]], step: int, checkpoints: Path, agree: bool) -> None:
    """Raise NonFiniteTraining if a gradient is NaN or inf; with `agree`, in every process when in any (each
    holding its own part of the gradients)."""
    norms = torch._foreach_norm([g for _, g in grads]) if grads else []
    finite = bool(torch.isfinite(torch.stack(norms)).all()) if norms else True
    if not (distributed.any_process(not finite) if agree else not finite):
        return
    bad = [n for (n, _), norm in zip(grads, norms) if not torch.isfinite(norm)]
    raise non_finite(step, checkpoints, f"{len(bad)} tensors, e.g. {bad[0]}" if bad else
                     "in another process's part of the gradients")


def non_finite(step: int, checkpoints: Path, what: str) -> NonFiniteTraining:
    return NonFiniteTraining(f"step {step}: the loss or gradients are NaN/inf ({what}); stopped before the "
                             f"optimizer step. Last checkpoint: {last_complete_checkpoint(checkpoints)}")


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that was fully written. The trainer writes trainer_state.json last, so a
    checkpoint torn by a kill lacks it or holds half of it."""
    complete = [c for c in checkpoints.glob("checkpoint-*") if _is_complete(c)]
    return max(complete, key=lambda c: int(c.name.split("-")[1]), default=None)


def _has_rng_states(checkpoint: Path, processes: int) -> bool:
    """Every process writes its own RNG state, with no barrier before the main process's trainer_state.json."""
    names = ["rng_state.pth"] if processes == 1 else [f"rng_state_{rank}.pth" for rank in range(processes)]
    return all((checkpoint / name).is_file() for name in names)


def _is_complete(checkpoint: Path) -> bool:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        step = int(checkpoint.name.split("-")[1])
    except (OSError, ValueError):
        return False
    if state.get("global_step") != step:
        return False
    if _by_deepspeed(checkpoint):  # DeepSpeed's own folder (the trainer writes trainer_state.json after it)
        return (checkpoint / "adapter_model.safetensors").is_file() and _zero_partitions(checkpoint) > 0
    return all((checkpoint / n).is_file() for n in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"))


def _by_deepspeed(checkpoint: Path) -> bool:
    """A checkpoint of a DeepSpeed launch: the engine's folder global_stepN (model and optimizer partitions, one
    per process), named by `latest`, instead of optimizer.pt."""
    return (checkpoint / "latest").is_file()


def _zero_partitions(checkpoint: Path) -> int:
    """How many processes' partitions the DeepSpeed folder holds whole (model and optimizer state both); 0 when
    they do not pair up."""
    folder = checkpoint / (checkpoint / "latest").read_text(encoding="utf-8").strip()
    optimizer = list(folder.glob("*zero_pp_rank_*_optim_states.pt"))
    model = list(folder.glob("zero_pp_rank_*_model_states.pt"))
    return len(optimizer) if len(optimizer) == len(model) else 0


def _resumable_here(checkpoint: Path) -> None:
    """DeepSpeed resumes only its own checkpoints, written by as many processes; the other launches only theirs
    (they share one layout). Refuse before training, naming the checkpoint."""
    processes = distributed.world_size()
    if _by_deepspeed(checkpoint) and not distributed.zero3():
        raise FinetuneError(f"{checkpoint} was written by a DeepSpeed launch (its optimizer state is in DeepSpeed's "
                            "partitions): resume it with the same DeepSpeed config and number of processes")
    if distributed.zero3() and not _by_deepspeed(checkpoint):
        raise FinetuneError(f"{checkpoint} was written without DeepSpeed (optimizer.pt): DeepSpeed resumes only its "
                            "own checkpoints; resume it with the launch that wrote it (one process, DDP or FSDP)")
    if distributed.zero3():
        written = _zero_partitions(checkpoint)
        if written != processes:
            raise FinetuneError(f"{checkpoint} holds the ZeRO-3 partitions of {written} processes; DeepSpeed "
                                f"resumes them in {written} processes, not {processes}")


def _resume_choice(checkpoints: Path) -> tuple[Path | None, bool]:
    """The checkpoint --resume continues from (the newest complete one, preferring those holding this launch's
    RNG states), and whether it holds them."""
    complete = sorted((c for c in checkpoints.glob("checkpoint-*") if _is_complete(c)),
                      key=lambda c: int(c.name.split("-")[1]))
    exact = [c for c in complete if _has_rng_states(c, distributed.world_size())]
    return (exact[-1] if exact else complete[-1] if complete else None), bool(exact)


def refuse_unresumable(stage_dirs: list[Path]) -> None:
    """Before anything loads: a stage's checkpoint that this launch cannot resume (`_resumable_here`) is refused
    now, not after the base model and the data."""
    for stage_dir in stage_dirs:
        found, _ = _resume_choice(stage_dir / "checkpoints")
        if found is not None:
            _resumable_here(found)


def checkpoint_to_resume(stage_dir: Path, resume: bool) -> Path | None:
    """On --resume: the last complete checkpoint, after moving torn ones out of the trainer's way (its
    rotation would count them and could delete a complete one)."""
    if not resume:
        return None
    checkpoints = stage_dir / "checkpoints"
    found, exact = _resume_choice(checkpoints)
    if found is not None:
        _resumable_here(found)
    if found is not None and not exact:
        print(f"[resume] {found} holds the RNG states of another number of processes: the data order continues, "
              "dropout draws do not repeat exactly")
    # every process has chosen before the main process removes anything (whether or not the folder exists yet:
    # the main process's trainer creates it)
    distributed.barrier()
    if distributed.is_main():
        for torn in [c for c in checkpoints.glob("checkpoint-*") if not _is_complete(c)]:
            print(f"[resume] ignoring the incomplete checkpoint {torn}")
            shutil.rmtree(torn)
    print(f"[resume] {'continuing from ' + str(found) if found else 'no complete checkpoint: starting the stage over'}")
    return found


def train(trainer, stage_dir: Path, resume: bool, stop: StopSignal) -> None:
    """Run the trainer (from a checkpoint on resume); raise StopRequested if SIGTERM ended it early."""
    trainer.train(resume_from_checkpoint=str(c) if (c := checkpoint_to_resume(stage_dir, resume)) else None)
    stop.check(f"at step {trainer.state.global_step} (checkpoint {last_complete_checkpoint(stage_dir / 'checkpoints')})")


def stage_finished(stage_dir: Path) -> bool:
    path = stage_dir / "manifest.json"
    return path.is_file() and read_manifest(stage_dir).get("complete") is True


class ShardedModelTrainer:
    """The trainer methods that differ for a model `distributed.shard` spread over the processes: gradient
    accumulation and checkpoints. Mixed in before trl's trainer class by `trainer_class`.

    The trainer sees an FSDP2 model it did not wrap, as one transformers sharded at load time, and its gradient
    accumulation keeps the gradients unreduced until the last micro-batch of a step (`_defer_fsdp_gradient_reduction`,
    whose own version asks the model's config for transformers' sharding settings, which ours does not have).

    Every process gathers the whole adapters (DPO's frozen reference too) and optimizer state from the shards;
    the main process writes them in the layout of an unsharded run (adapter_model.safetensors, optimizer.pt keyed
    as torch's own `optimizer.state_dict()`, scheduler.pt, and each process's rng_state_N.pth by the trainer), so a
    checkpoint resumes under the other launcher too. On resume each process reads the trained adapter and the
    optimizer state whole and keeps its own part.
    """

    @contextmanager
    def _defer_fsdp_gradient_reduction(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        adapters = tuple(f".{name}." for name in self.model.peft_config)
        whole = {name: distributed.whole(p).cpu() for name, p in self.model.named_parameters()
                 if any(tag in name for tag in adapters)}
        if self.args.should_save:
            super()._save(output_dir, state_dict=whole)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, _torch_optimizer(self.optimizer),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            torch.save(_keyed_by_position(state), os.path.join(output_dir, "optimizer.pt"))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        path = Path(resume_from_checkpoint) / "adapter_model.safetensors"
        saved = load_file(str(path))
        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for name, key in self._saved_names(list(trainable)).items():
                if key not in saved:
                    raise FinetuneError(f"{path}: no tensor {key} for the trainable weight {name}; the checkpoint "
                                        "is not from this recipe's adapter")
                trainable[name].copy_(distributed.place_like(saved[key], trainable[name]))

    def _saved_names(self, names: list[str]) -> dict[str, str]:
        """Parameter name -> the name peft saves it under (adapter name taken out, router copies renamed), asked
        of peft itself with a stand-in tensor per name."""
        from peft import get_peft_model_state_dict

        renamed = get_peft_model_state_dict(self.model, state_dict={n: torch.tensor(i) for i, n in enumerate(names)})
        found = {names[int(index)]: key for key, index in renamed.items()}
        if len(found) != len(names):
            raise FinetuneError(f"peft saves no checkpoint tensor for {sorted(set(names) - set(found))[:3]}: "
                                "they could not be restored on resume")
        return found

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if checkpoint is None:
            return
        folder, optimizer = Path(checkpoint), _torch_optimizer(self.optimizer)
        state = {}
        if self.args.should_save:  # read by the main process, sent to the others in parts
            state = _keyed_by_name(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
                                   optimizer, self.model)
        set_optimizer_state_dict(self.model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _keyed_by_position(state: dict) -> dict:
    """torch.distributed.checkpoint keys the optimizer state by parameter name; torch's `optimizer.state_dict()`,
    which an unsharded run saves, by position over the parameter groups. The positions, so that both load both."""
    position = {name: i for i, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return {"state": {position[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def _keyed_by_name(state: dict, optimizer, model) -> dict:
    """The inverse of `_keyed_by_position`, the names taken from the optimizer's parameters in the model."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


class ZeroTrainer:
    """Under DeepSpeed ZeRO-3 the trainer, accelerate and DeepSpeed do the partitioning, the checkpoints
    (adapter_model.safetensors gathered, DeepSpeed's own global_stepN folder for the optimizer) and their resume.

    What differs is the NaN guard. accelerate takes DeepSpeed's optimizer step inside the backward, before any
    trainer callback, and the gradients live in DeepSpeed's partitions. DeepSpeed itself skips a step whose
    gradient norm (over every process) is NaN or inf, leaving the weights as they were, and counts it in
    `skipped_steps`; training would go on with NaN losses. So a skipped step stops the run here, in every process
    at once (they share the norm)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        skipped = self.model_wrapped.skipped_steps
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.model_wrapped.skipped_steps > skipped:
            raise non_finite(self.state.global_step + 1, Path(self.args.output_dir),
                             "DeepSpeed skipped the optimizer step")
        return loss


def trainer_class(trainer: type) -> type:
    """trl's trainer class, or the same class with `ShardedModelTrainer`'s methods under FSDP, `ZeroTrainer`'s
    under DeepSpeed."""
    if distributed.fsdp():
        return type(f"Sharded{trainer.__name__}", (ShardedModelTrainer, trainer), {})
    if distributed.zero3():
        return type(f"Zero{trainer.__name__}", (ZeroTrainer, trainer), {})
    return trainer


def keep_non_reentrant_checkpointing(trainer) -> None:
    """trl turns a PEFT model's gradient checkpointing reentrant under ZeRO-3, its workaround for frozen weights
    found partitioned when a layer is recomputed (DeepSpeed issue 4332, which the DeepSpeed we pin handles itself:
    `update_recompute_parameters`). For a Mixtral that loses a gradient: reentrant checkpointing runs each layer's
    forward without autograd and returns only its hidden states, so the router logits that the load-balancing
    loss is built from carry no gradient back through the layer (measured on the tiny model: LoRA gradients 6e-4
    off the unchecked ones). Non-reentrant checkpointing under ZeRO-3 gives the unsharded gradients exactly
    (tests/test_distributed.py), so it is put back before training: the trainer enables checkpointing in `train`
    from these arguments, and DPO's reference pass reads them too."""
    args = trainer.args
    settings = dict(args.activation_checkpointing_kwargs or {})
    if args.activation_checkpointing and settings.get("use_reentrant"):
        settings["use_reentrant"] = False
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = settings  # one is an alias
        if distributed.is_main():
            print("[distributed] ZeRO-3: gradient checkpointing stays non-reentrant (reentrant, which trl asks for "
                  "above, would drop the gradient of the router's load-balancing loss)")


class PartitionReport(TrainerCallback):
    """ZeRO-3 partitions the model as training starts: how much of it this process holds, printed once."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        distributed.report_held(model, f"DeepSpeed ZeRO-3 over {distributed.world_size()} processes")


def use_recipe_optimizer(trainer, stage: Training) -> None:
    """The recipe's `optimizer`, for the trainer to create when training starts (`OptimizerReport` says which it
    made). `optimizer_cls_and_kwargs` is the Trainer's own attribute; trl's DPOTrainer takes no such argument, so
    it is set here for both stages."""
    from finetune.optimizers import trainer_optimizer

    choice = trainer_optimizer(stage.optimizer, trainer.args)
    if choice is not None:
        trainer.optimizer_cls_and_kwargs = choice
    trainer.add_callback(OptimizerReport(stage.optimizer))


class OptimizerReport(TrainerCallback):
    """Prints, once training starts, the optimizer the trainer made for the recipe's `optimizer` key."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        if distributed.is_main() and inner is not None:
            print(f"[train] optimizer {self.name}: {type(inner).__module__}.{type(inner).__qualname__}")


def shard_trained_model(trainer) -> None:
    """Under FSDP: shard the model now that the trainer is built (trl has copied DPO's reference adapter), and
    tell the trainer the model is already distributed, so that it neither moves it nor wraps it in DDP (the
    trainer's own flag for a model transformers sharded at load time)."""
    distributed.shard(trainer.model)
    trainer.is_distributed_loading_by_transformers = True


def run_stage_trainer(recipe: Recipe, kind: str, stage: Training, stage_dir: Path, base_path: Path,
                      resume: bool, stop: StopSignal, build, **manifest_fields: Any) -> Path:
    """What every stage does around its trainer: dashboards open, build (given the callbacks), train or resume,
    final eval, save the adapter, routing telemetry, the manifest. Returns the adapter folder."""
    from finetune import model as models
    from finetune.telemetry import finish_stage
    from finetune.tracking import StageDashboards

    with StageDashboards.open(recipe, kind, stage_dir) as dashboards:
        trainer, data = build(stage_callbacks(recipe, stage, stage_dir, dashboards))
        use_recipe_optimizer(trainer, stage)
        if distributed.fsdp():
            shard_trained_model(trainer)
        elif distributed.zero3():
            trainer.add_callback(PartitionReport())
            keep_non_reentrant_checkpointing(trainer)
        elif distributed.world_size() > 1:
            distributed.skip_frozen_sync(trainer.model)
        train(trainer, stage_dir, resume, stop)
        final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}

        adapter_dir = stage_dir / "adapter"
        write = distributed.is_main()  # the adapter is the same in every process; one writes it
        # a sharded model is gathered, and runs its forwards (routing drift), in every process at once
        if write or distributed.sharded():
            models.save_adapter(trainer.model, adapter_dir, write=write)
            routing = finish_stage(trainer, kind, stage_dir, dashboards, recipe.tracking.drift_examples,
                                   recipe.data.max_seq_len, write=write)
        if write:
            trainer.state.save_to_json(str(stage_dir / "trainer_state.json"))
            write_manifest(stage_dir, stage=kind, base_model=str(base_path), adapter=str(adapter_dir),
                           **manifest_fields, lora=recipe.lora.model_dump(), data_fingerprint=data.pop("fingerprint"),
                           examples=data, final_eval=final_eval, routing=routing,
                           processes=distributed.world_size(), launch=distributed.launch(),
                           sharded=distributed.sharded())
    distributed.barrier()  # the next stage reads this one's adapter
    return adapter_dir
