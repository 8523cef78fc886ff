"""Merge the final adapter into the base weights, write a stock-loadable model, and verify it.

Only stock transformers and peft are used to merge and to check, so what is verified is what a user of
`AutoModelForCausalLM.from_pretrained` gets. The adapter is merged into the original (unquantized) base
weights: that is what serving stacks load, and it avoids baking the 4-bit rounding into the export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from finetune.errors import FinetuneError
from finetune.model import DTYPES

VERIFY_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 3 to 7."}],
    [{"role": "user", "content": "Écris une phrase en français, s'il te plaît."}],
]


class ExportError(FinetuneError):
    """The merged model failed a check; nothing was left in the export folder."""


def export_merged(base_path: Path, adapter_dir: Path, tokenizer, out_dir: Path, dtype: str, tolerance: float,
                  card: str) -> Path:
    """Write base+adapter merged to out_dir (via a temporary folder, replaced only once verified)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.data.chat import tokenize_prompt

    prompts = [torch.tensor([tokenize_prompt(p, tokenizer)]) for p in VERIFY_PROMPTS]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype])
    model = PeftModel.from_pretrained(base, adapter_dir)
    reference = _logits(model, prompts)
    merged = model.merge_and_unload()

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging, safe_serialization=True)
    merged.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(card, encoding="utf-8")
    del merged, model, base

    try:
        report = verify_export(staging, prompts, reference, tolerance)
    except ExportError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / "verification.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


def verify_export(folder: Path, prompts: list[torch.Tensor], reference: list[torch.Tensor], tolerance: float) -> dict:
    """Reload with stock transformers alone and compare logits with base+adapter on fixed prompts."""
    from transformers import AutoModelForCausalLM

    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles:
        raise ExportError(f"{folder}: pickle files in the export: {pickles}")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # any failure to load is a failed export
        raise ExportError(f"{folder}: the export does not load with stock transformers: {e}") from e
    exported = _logits(model, prompts)
    worst = max((a - b).abs().max().item() for a, b in zip(exported, reference))
    if not all(torch.isfinite(x).all() for x in exported):
        raise ExportError(f"{folder}: the export produces NaN or inf logits")
    if worst > tolerance:
        raise ExportError(f"{folder}: logits differ from base+adapter by {worst:.3g} (> tolerance {tolerance})")
    return {"max_abs_logit_difference": worst, "tolerance": tolerance, "prompts": len(prompts)}


@torch.no_grad()
def _logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=p).logits.float() for p in prompts]
