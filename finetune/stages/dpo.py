"""Direct preference optimization, continuing from the SFT adapter, with trl's DPOTrainer.

The reference policy is the SFT policy: trl copies the loaded SFT adapter into a frozen adapter named
"ref" on the same 4-bit base and computes reference log-probabilities with it, so no second copy of the
model is loaded. Without an SFT stage before it, the reference is the base model (adapters disabled).
"""

from __future__ import annotations

from pathlib import Path

from finetune import model as models
from finetune.data.prepare import Prepared
from finetune.recipe.schema import DPOStage, Recipe
from finetune.stages.common import (MetricsLog, StopSignal, TrainingGuard, run_stage_trainer, trainer_class,
                                    trainer_kwargs)


def build_dpo_trainer(recipe: Recipe, stage: DPOStage, base_path: Path, tokenizer, prepared: Prepared,
                      stage_dir: Path, sft_adapter: Path | None, stop: StopSignal, callbacks: list = ()):
    """The prepared preference data, the 4-bit base with the SFT adapter (trainable, and copied as the reference);
    `callbacks` are added to the trainer's own (dashboards, router telemetry)."""
    from trl import DPOConfig, DPOTrainer

    print(prepared.summary())
    train_rows, held_out = prepared.train, prepared.eval

    device = models.resolve_device(recipe.model)
    base, report = models.load_base(recipe.model, base_path, device)
    print(report)
    if sft_adapter is not None:
        print(f"[dpo] continuing from the SFT adapter {sft_adapter}; it is also the reference policy")
        model = models.load_adapter(base, sft_adapter, recipe.lora, trainable=True)
    else:
        model = models.attach_new_adapter(base, recipe.lora)
    print(models.trainable_summary(model))
    models.apply_stage_memory_settings(model, stage, device)

    args = DPOConfig(**{**trainer_kwargs(recipe, stage, stage_dir, bool(held_out), device),
                        "beta": stage.beta, "loss_type": [stage.loss_type], **prepared.trainer_kwargs})
    with models.fp32_adapter_weights(model):
        trainer = trainer_class(DPOTrainer)(
            model=model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=held_out,
            processing_class=tokenizer,
            callbacks=[MetricsLog(stage_dir / "metrics.jsonl"), TrainingGuard(stop, "dpo"), *callbacks],
        )
    data = {**prepared.manifest(), "fingerprint": prepared.fingerprint}
    return trainer, data


def run_dpo(recipe: Recipe, stage: DPOStage, base_path: Path, tokenizer, prepared: Prepared, stage_dir: Path,
            sft_adapter: Path | None, resume: bool, stop: StopSignal) -> Path:
    """Train on preference pairs (`prepared`); returns the adapter folder."""
    return run_stage_trainer(
        recipe, "dpo", stage, stage_dir, base_path, resume, stop,
        lambda callbacks: build_dpo_trainer(recipe, stage, base_path, tokenizer, prepared, stage_dir, sft_adapter,
                                            stop, callbacks),
        reference_policy=str(sft_adapter) if sft_adapter else "base model")
