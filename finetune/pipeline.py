"""`finetune run`: one recipe, top to bottom. Base model, tokenizer, each stage in order, then the export.

Stages hand off through the run folder: each writes its adapter, metrics and a manifest, and run.json
records where everything went.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from finetune.errors import FinetuneError, is_disk_error, one_line
from finetune.recipe import Recipe, dump_recipe
from finetune.recipe.schema import MIXTRAL_TOKENIZER, TINY_MIXTRAL


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict:
    from finetune.secrets import refuse_secrets

    refuse_secrets(recipe.model_dump(mode="json"), "recipe")  # before anything is written or imported
    from finetune import distributed
    from finetune.data.prepare import prepare
    from finetune.model import prepare_base, resolve_device
    from finetune.stages.common import StopSignal, refuse_a_step_at_rate_zero, refuse_unresumable, stage_finished

    for index, stage in enumerate(recipe.stages):  # a batch that cannot be split fails before anything loads
        distributed.accumulation_per_process(index, stage.batch_size, stage.grad_accum, distributed.world_size())
    device = resolve_device(recipe.model)
    distributed.refuse_unsupported_model(recipe.model, device)
    distributed.start(device)
    distributed.refuse_unsupported_optimizers(recipe.stages)  # after `start`, which tells an FSDP launch
    run_dir = recipe.run_dir
    with StopSignal() as stop, disk_errors(run_dir):
        check_run_dir(recipe, resume, overwrite)
        continuing = resume and not overwrite
        if continuing and not (run_dir / "recipe.yaml").is_file() and distributed.is_main():
            # a scheduler restarts a job with the same command: its first start finds no run, and says so
            print(f"[resume] no run in {run_dir} yet: starting one")
        if continuing:
            refuse_unresumable([run_dir / s.type for s in recipe.stages if not stage_finished(run_dir / s.type)])
        # every stage's data is read and checked before the folder changes (a bad DPO row found after hours of
        # SFT, or after --overwrite deleted the previous run, costs what it would have saved)
        tokenizer = load_tokenizer(recipe.model.tokenizer)
        to_run = [s.type for s in recipe.stages if not (continuing and stage_finished(run_dir / s.type))]
        with distributed.main_first():  # the main process fills the data cache, the others read it
            prepared = {kind: prepare(recipe, tokenizer, kind) for kind in to_run}
            for index, stage in enumerate(recipe.stages):
                if stage.type in prepared:
                    refuse_a_step_at_rate_zero(index, stage, len(prepared[stage.type].train), distributed.world_size())
        data = {kind: list(p.sources) for kind, p in prepared.items()}
        if continuing:
            refuse_changed_data(recipe, data)
        # a checkpoint base likewise: downloaded by the main process (the others find it in the cache), and one
        # that cannot be had or is not a Mixtral refused, before the folder changes
        with distributed.main_first():
            base_path = None if recipe.model.name_or_path == TINY_MIXTRAL else prepare_base(recipe.model, run_dir,
                                                                                            recipe.seed)
        distributed.barrier()  # every process has read the folder before the main process changes it
        with distributed.main_first():
            if distributed.is_main():
                prepare_run_dir(recipe, overwrite)
                record_data(run_dir, data)
        return run_stages(recipe, resume, stop, tokenizer, prepared, base_path)


def refuse_changed_data(recipe: Recipe, data: dict[str, list[str]]) -> None:
    """--resume continues a stage's checkpoint only on the data files it was trained on (their content; the
    settings are the recipe's, which `check_run_dir` compares)."""
    from finetune.stages.common import last_complete_checkpoint

    recorded = _recorded_data(recipe.run_dir)
    for kind, now in data.items():
        was = recorded.get(kind)
        checkpoint = last_complete_checkpoint(recipe.run_dir / kind / "checkpoints")
        if was is None or was == now or checkpoint is None:
            continue
        sources = getattr(recipe.data, kind).sources
        changed = [s.name for s, a, b in zip(sources, was, now) if a != b] if len(was) == len(now) else []
        raise FinetuneError(f"data.{kind}: {', '.join(changed) or 'the data'} changed since {checkpoint} was "
                            "trained on it (content fingerprint); resume needs the same data: put it back, or pass "
                            "--overwrite to start the run over")


def record_data(run_dir: Path, data: dict[str, list[str]]) -> None:
    """data.json: each stage's data files' content fingerprints (a finished stage, not run again, keeps its own)."""
    record = {**_recorded_data(run_dir), **data}
    tmp = run_dir / "data.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / "data.json")


def _recorded_data(run_dir: Path) -> dict[str, list[str]]:
    path = run_dir / "data.json"
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FinetuneError(f"{path}: not the JSON a run writes ({e}); remove it to resume without the data check")
    return {k: v for k, v in record.items() if isinstance(v, list)} if isinstance(record, dict) else {}


def run_stages(recipe: Recipe, resume: bool, stop, tokenizer, prepared: dict, base_path: Path | None) -> dict:
    """Each stage in turn, then the export; `base_path` None is the embedded tiny Mixtral, built into the run."""
    from transformers import set_seed

    from finetune import distributed
    from finetune.model import prepare_base
    from finetune.stages.common import stage_finished
    from finetune.tracking import dashboard_lines

    started = time.perf_counter()
    run_dir = recipe.run_dir
    set_seed(recipe.seed)
    if base_path is None:
        with distributed.main_first():
            base_path = prepare_base(recipe.model, run_dir, recipe.seed)
    if distributed.is_main():
        save_tokenizer(tokenizer, run_dir / "tokenizer")
    record = {"recipe": str((run_dir / "recipe.yaml").resolve()), "base_model": str(base_path.resolve()),
              "tokenizer": str((run_dir / "tokenizer").resolve()), "stages": {}}

    adapter = None
    for stage in recipe.stages:
        stage_dir = run_dir / stage.type
        stop.check(f"before the {stage.type} stage")
        if resume and stage_finished(stage_dir):
            print(f"\n=== stage {stage.type}: already finished in {stage_dir}, not run again")
            adapter = stage_dir / "adapter"
        else:
            set_seed(recipe.seed)  # a resumed run and a fresh one start each stage from the same RNG state
            adapter = run_stage(recipe, stage, base_path, tokenizer, stage_dir, adapter, resume, stop,
                                prepared.pop(stage.type))  # not kept past its stage (in memory without the cache)
        record["stages"][stage.type] = str(stage_dir.resolve())
    record["final_adapter"] = str(adapter.resolve())
    if distributed.is_main():
        write_record(run_dir, record)
    stop.check("before the export")
    distributed.leave_zero3()
    if not distributed.is_main():
        return record  # the export and the run record are the main process's

    if recipe.export.merge:
        record["export"] = str(export(recipe).resolve())
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["dashboards"] = dashboard_lines(recipe)
    write_record(run_dir, record)
    print_artifacts(record)
    return record


def write_record(run_dir: Path, record: dict) -> None:
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / "run.json")


def check_run_dir(recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two different runs in one folder (read-only, so every process can check it)."""
    run_dir = recipe.run_dir
    saved = run_dir / "recipe.yaml"
    if overwrite:
        refuse_to_delete(run_dir)
        return
    if not saved.is_file():
        return
    if not resume:
        raise FinetuneError(f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to "
                            "start it over, or choose another output_dir")
    text = dump_recipe(recipe)
    if saved.read_text(encoding="utf-8") != text:
        changed = _changed_keys(yaml.safe_load(saved.read_text(encoding="utf-8")), yaml.safe_load(text))
        raise FinetuneError(f"{saved}: the recipe differs from the one this run started with "
                            f"({', '.join(changed)}); resume needs the same recipe")


# what a run writes in its folder (README: What a run writes), and the temporary names it writes them under
RUN_ENTRIES = {"recipe.yaml", "run.json", "data.json", "base-model", "tokenizer", "sft", "dpo", "tracking.json",
               "wandb", "tensorboard", "mlflow.db", "mlartifacts", "report", "export", "export-adapter"}
# and what is left beside them: a temporary name, SQLite's journal of mlflow.db (-journal, -wal, -shm) when a run
# was killed while logging, the operating system's own files
SIDE_FILE = re.compile(r"(?P<entry>.+?)(\.tmp|\.partial|\.old|-journal|-wal|-shm)|\.DS_Store|\.nfs.*")


def refuse_to_delete(run_dir: Path) -> None:
    """--overwrite empties output_dir: only a folder that holds a run and nothing else (no file of the user's)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise FinetuneError(f"output_dir {run_dir} is not a folder")
    names = sorted(p.name for p in run_dir.iterdir())
    if names and "recipe.yaml" not in names:
        raise FinetuneError(f"--overwrite: {run_dir} does not hold a run (no recipe.yaml), so it is not deleted; "
                            "choose an empty or new output_dir")
    foreign = [n for n in names if n not in RUN_ENTRIES and not (
        (side := SIDE_FILE.fullmatch(n)) and side["entry"] in (None, *RUN_ENTRIES))]
    if foreign:
        raise FinetuneError(f"--overwrite: {run_dir} holds what a run does not write ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}), so it is not deleted; move those away or "
                            "choose another output_dir")


def prepare_run_dir(recipe: Recipe, overwrite: bool) -> None:
    """Create the run folder (emptied first with --overwrite) and save the resolved recipe."""
    run_dir = recipe.run_dir
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "recipe.yaml"
    tmp = saved.with_suffix(".yaml.tmp")
    tmp.write_text(dump_recipe(recipe), encoding="utf-8")
    tmp.replace(saved)


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in _changed_keys(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]


@contextmanager
def disk_errors(run_dir: Path):
    """A full disk or an unwritable folder becomes one clear error naming the path, not a library traceback."""
    try:
        yield
    except FinetuneError:
        raise
    except Exception as e:
        if not is_disk_error(e):
            raise
        if isinstance(e, OSError):
            raise FinetuneError(f"cannot write {e.filename or run_dir}: {os.strerror(e.errno)}") from e
        raise FinetuneError(f"cannot write under {run_dir}: {e}") from e


def load_tokenizer(name: str):
    if name == MIXTRAL_TOKENIZER:
        from finetune.tokenizer import build_mixtral_tokenizer

        return build_mixtral_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:  # a folder without a tokenizer; a hub id offline, mistyped or gated
        cause = one_line(e)[:300]
        fix = ("give a folder holding tokenizer.json and tokenizer_config.json" if Path(name).exists() else
               f"download it first (hf download {name} --include '*.json' '*.model') or give a local tokenizer folder")
        raise FinetuneError(f"model.tokenizer {name!r}: cannot be loaded ({cause}); {fix}") from None


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The run's tokenizer, with the SentencePiece file it was loaded from: transformers 5 saves tokenizer.json only,
    and the export hands tokenizer.model on to the tools that read it (llama.cpp's converter, TGI)."""
    tokenizer.save_pretrained(folder)
    source = getattr(tokenizer, "vocab_file", None)
    target = folder / "tokenizer.model"
    if source and Path(source).name == target.name and Path(source).is_file() and not _same_file(source, target):
        shutil.copyfile(source, target)  # not when the run's own tokenizer folder is model.tokenizer


def _same_file(a, b: Path) -> bool:
    return b.exists() and os.path.samefile(a, b)


def run_stage(recipe: Recipe, stage, base_path: Path, tokenizer, stage_dir: Path, previous_adapter: Path | None,
              resume: bool, stop, prepared) -> Path:
    stage_dir.mkdir(parents=True, exist_ok=True)  # every process: each writes its RNG state into checkpoints
    print(f"\n=== stage {stage.type} -> {stage_dir}")
    if stage.type == "sft":
        from finetune.stages.sft import run_sft

        return run_sft(recipe, stage, base_path, tokenizer, prepared, stage_dir, resume, stop)
    from finetune.stages.dpo import run_dpo

    return run_dpo(recipe, stage, base_path, tokenizer, prepared, stage_dir, previous_adapter, resume, stop)


def export(recipe: Recipe) -> Path:
    from finetune.export import RunFiles, export_merged

    out_dir = recipe.run_dir / "export"
    print(f"\n=== export -> {out_dir}")
    export_merged(RunFiles.read(recipe.run_dir), out_dir, dtype=recipe.export.dtype, base=recipe.export.base,
                  max_shard_size=recipe.export.max_shard_size, tolerance=recipe.export.verify_tolerance)
    return out_dir


def print_artifacts(record: dict) -> None:
    print("\n=== done in", record["seconds"], "s. Artifacts:")
    print(f"  resolved recipe : {record['recipe']}")
    print(f"  base model      : {record['base_model']}")
    for name, path in record["stages"].items():
        print(f"  {name:<16}: {path}  (adapter/, metrics.jsonl, manifest.json)")
    if "export" in record:
        print(f"  merged export   : {record['export']}")
    for line in record.get("dashboards", []):
        print(f"  {line}")
