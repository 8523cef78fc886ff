"""`finetune run`: one recipe, top to bottom. Base model, tokenizer, each stage in order, then the export.

Stages hand off through the run folder: each writes its adapter, metrics and a manifest, and run.json
records where everything went.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from finetune.recipe import Recipe, dump_recipe
from finetune.recipe.schema import MIXTRAL_TOKENIZER


def run(recipe: Recipe) -> dict:
    from transformers import set_seed

    from finetune.model import prepare_base

    started = time.perf_counter()
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    set_seed(recipe.seed)

    base_path = prepare_base(recipe.model, run_dir, recipe.seed)
    tokenizer = load_tokenizer(recipe.model.tokenizer)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    record = {"recipe": str((run_dir / "recipe.yaml").resolve()), "base_model": str(base_path.resolve()),
              "tokenizer": str((run_dir / "tokenizer").resolve()), "stages": {}}

    adapter = None
    for stage in recipe.stages:
        adapter = run_stage(recipe, stage, base_path, tokenizer, run_dir / stage.type, adapter)
        record["stages"][stage.type] = str((run_dir / stage.type).resolve())
    record["final_adapter"] = str(adapter.resolve())

    if recipe.export.merge:
        record["export"] = str(export(recipe, base_path, adapter, tokenizer, run_dir / "export").resolve())
    record["seconds"] = round(time.perf_counter() - started, 1)
    (run_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print_artifacts(record)
    return record


def load_tokenizer(name: str):
    if name == MIXTRAL_TOKENIZER:
        from finetune.tokenizer import build_mixtral_tokenizer

        return build_mixtral_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def run_stage(recipe: Recipe, stage, base_path: Path, tokenizer, stage_dir: Path, previous_adapter: Path | None):
    stage_dir.mkdir(parents=True, exist_ok=True)
    print(f"\n=== stage {stage.type} -> {stage_dir}")
    if stage.type == "sft":
        from finetune.stages.sft import run_sft

        return run_sft(recipe, stage, base_path, tokenizer, stage_dir)
    from finetune.stages.dpo import run_dpo

    return run_dpo(recipe, stage, base_path, tokenizer, stage_dir, previous_adapter)


def export(recipe: Recipe, base_path: Path, adapter: Path, tokenizer, out_dir: Path) -> Path:
    from finetune.export import export_merged

    print(f"\n=== export -> {out_dir}")
    card = model_card(recipe, base_path)
    return export_merged(base_path, adapter, tokenizer, out_dir, recipe.export.dtype,
                         recipe.export.verify_tolerance, card)


def model_card(recipe: Recipe, base_path: Path) -> str:
    from finetune.stages.common import read_manifest

    lines = [f"# Fine-tune of {recipe.model.name_or_path}", "", f"Base checkpoint: `{base_path}`", "",
             "Stages, in order:"]
    for stage in recipe.stages:
        manifest = read_manifest(recipe.run_dir / stage.type)
        sources = getattr(recipe.data, stage.type).sources
        lines.append(f"- {stage.type}: data {[s.path or s.hub for s in sources]}, "
                     f"final eval {json.dumps(manifest.get('final_eval', {}))}")
    lines += ["", "Recipe:", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)


def print_artifacts(record: dict) -> None:
    print("\n=== done in", record["seconds"], "s. Artifacts:")
    print(f"  resolved recipe : {record['recipe']}")
    print(f"  base model      : {record['base_model']}")
    for name, path in record["stages"].items():
        print(f"  {name:<16}: {path}  (adapter/, metrics.jsonl, manifest.json)")
    if "export" in record:
        print(f"  merged export   : {record['export']}")
