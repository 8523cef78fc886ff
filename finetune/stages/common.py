"""What the SFT and DPO stages share: trainer arguments from the recipe, the metrics log, the stage manifest."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.recipe.schema import Recipe, Training

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
        gradient_accumulation_steps=stage.grad_accum,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        activation_checkpointing=stage.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if stage.gradient_checkpointing else None,
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=stage.save_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        report_to=[r for r in recipe.tracking.report_to if r != "none"] or "none",
        run_name=recipe.tracking.run_name,
        bf16=recipe.model.compute_dtype == "bfloat16" and device != "cpu",
        fp16=recipe.model.compute_dtype == "float16",
        use_cpu=device == "cpu",
        max_length=recipe.data.max_seq_len,
        router_aux_loss_coef=stage.router_aux_loss_coef,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


class MetricsLog(TrainerCallback):
    """Appends every logged value to metrics.jsonl in the stage folder, one JSON object per log call."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def write_manifest(stage_dir: Path, **fields: Any) -> None:
    """The stage's hand-off to the next one: what it trained from, with what, and what it produced."""
    manifest = {**fields, "versions": {name: version(name) for name in LIBRARIES}}
    tmp = stage_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(stage_dir / "manifest.json")


def read_manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text(encoding="utf-8"))


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
