"""Direct preference optimization, continuing from the SFT adapter, with trl's DPOTrainer.

The reference policy is the SFT policy: trl copies the loaded SFT adapter into a frozen adapter named
"ref" on the same 4-bit base and computes reference log-probabilities with it, so no second copy of the
model is loaded. Without an SFT stage before it, the reference is the base model (adapters disabled).
"""

from __future__ import annotations

from pathlib import Path

from finetune import model as models
from finetune.data.examples import preference_examples
from finetune.data.sources import fingerprint, read_stage_rows, split_eval
from finetune.recipe.schema import DPOStage, Recipe
from finetune.stages.common import MetricsLog, trainer_kwargs, write_manifest


def run_dpo(recipe: Recipe, stage: DPOStage, base_path: Path, tokenizer, stage_dir: Path,
            sft_adapter: Path | None) -> Path:
    """Train on preference pairs; returns the adapter folder."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    examples = preference_examples(read_stage_rows(recipe.data.dpo, recipe.seed), tokenizer, recipe.data.max_seq_len)
    print(f"[dpo] data: {examples.summary()}")
    train, held_out = split_eval(examples.rows, recipe.data.dpo.eval_fraction, recipe.seed)

    device = models.resolve_device(recipe.model)
    base, report = models.load_base(recipe.model, base_path, device)
    print(report)
    if sft_adapter is not None:
        print(f"[dpo] continuing from the SFT adapter {sft_adapter}; it is also the reference policy")
        model = models.load_adapter(base, sft_adapter, recipe.lora, trainable=True)
    else:
        model = models.attach_new_adapter(base, recipe.lora)
    print(models.trainable_summary(model))

    args = DPOConfig(**trainer_kwargs(recipe, stage, stage_dir, bool(held_out), device),
                     beta=stage.beta, loss_type=[stage.loss_type])
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held_out) if held_out else None,
        processing_class=tokenizer,
        callbacks=[MetricsLog(stage_dir / "metrics.jsonl")],
    )
    trainer.train()
    final_eval = trainer.evaluate() if held_out else {}

    adapter_dir = stage_dir / "adapter"
    models.save_adapter(model, adapter_dir)
    trainer.state.save_to_json(str(stage_dir / "trainer_state.json"))
    write_manifest(stage_dir, stage="dpo", base_model=str(base_path), adapter=str(adapter_dir),
                   reference_policy=str(sft_adapter) if sft_adapter else "base model",
                   lora=recipe.lora.model_dump(), data_fingerprint=fingerprint(recipe.data.dpo),
                   examples={"train": len(train), "eval": len(held_out), "dropped": dict(examples.dropped)},
                   final_eval=final_eval)
    return adapter_dir
