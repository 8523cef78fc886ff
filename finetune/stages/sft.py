"""Supervised fine-tuning: chat rows in, a LoRA adapter out, with trl's SFTTrainer."""

from __future__ import annotations

from pathlib import Path

from finetune import model as models
from finetune.data.examples import sft_examples
from finetune.data.sources import fingerprint, read_stage_rows, split_eval
from finetune.recipe.schema import Recipe, SFTStage
from finetune.stages.common import MetricsLog, trainer_kwargs, write_manifest


def run_sft(recipe: Recipe, stage: SFTStage, base_path: Path, tokenizer, stage_dir: Path) -> Path:
    """Train a new adapter on the SFT data; returns the adapter folder."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    examples = sft_examples(read_stage_rows(recipe.data.sft, recipe.seed), tokenizer,
                            recipe.data.max_seq_len, recipe.data.train_on_prompt)
    print(f"[sft] data: {examples.summary()}")
    train, held_out = split_eval(examples.rows, recipe.data.sft.eval_fraction, recipe.seed)

    device = models.resolve_device(recipe.model)
    base, report = models.load_base(recipe.model, base_path, device)
    print(report)
    model = models.attach_new_adapter(base, recipe.lora)
    print(models.trainable_summary(model))

    args = SFTConfig(**trainer_kwargs(recipe, stage, stage_dir, bool(held_out), device),
                     completion_only_loss=True)
    trainer = SFTTrainer(
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
    write_manifest(stage_dir, stage="sft", base_model=str(base_path), adapter=str(adapter_dir),
                   lora=recipe.lora.model_dump(), data_fingerprint=fingerprint(recipe.data.sft),
                   examples={"train": len(train), "eval": len(held_out), "dropped": dict(examples.dropped)},
                   final_eval=final_eval)
    return adapter_dir
