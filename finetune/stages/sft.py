"""Supervised fine-tuning: chat rows in, a LoRA adapter out, with trl's SFTTrainer."""

from __future__ import annotations

from pathlib import Path

from finetune import model as models
from finetune.data.prepare import Prepared
from finetune.recipe.schema import Recipe, SFTStage
from finetune.stages.common import (MetricsLog, StopSignal, TrainingGuard, run_stage_trainer, trainer_class,
                                    trainer_kwargs)


def build_sft_trainer(recipe: Recipe, stage: SFTStage, base_path: Path, tokenizer, prepared: Prepared,
                      stage_dir: Path, stop: StopSignal, callbacks: list = ()):
    """The prepared data, the 4-bit base with a new adapter, and trl's trainer, ready to train; `callbacks` are added to
    the trainer's own (dashboards, router telemetry)."""
    from trl import SFTConfig, SFTTrainer

    print(prepared.summary())
    train_rows, held_out = prepared.train, prepared.eval

    device = models.resolve_device(recipe.model)
    base, report = models.load_base(recipe.model, base_path, device)
    print(report)
    model = models.attach_new_adapter(base, recipe.lora)
    print(models.trainable_summary(model))
    models.apply_stage_memory_settings(model, stage, device)

    # the data's settings (padding-free packing) override the stage's, e.g. max_length
    args = SFTConfig(**{**trainer_kwargs(recipe, stage, stage_dir, bool(held_out), device),
                        "completion_only_loss": True, **prepared.trainer_kwargs})
    with models.fp32_adapter_weights(model):
        trainer = trainer_class(SFTTrainer)(
            model=model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=held_out,
            processing_class=tokenizer,
            callbacks=[MetricsLog(stage_dir / "metrics.jsonl"), TrainingGuard(stop, "sft"), *callbacks],
        )
    data = {**prepared.manifest(), "fingerprint": prepared.fingerprint}
    return trainer, data


def run_sft(recipe: Recipe, stage: SFTStage, base_path: Path, tokenizer, prepared: Prepared, stage_dir: Path,
            resume: bool, stop: StopSignal) -> Path:
    """Train a new adapter on the SFT data (`prepared`); returns the adapter folder."""
    return run_stage_trainer(
        recipe, "sft", stage, stage_dir, base_path, resume, stop,
        lambda callbacks: build_sft_trainer(recipe, stage, base_path, tokenizer, prepared, stage_dir, stop, callbacks))
