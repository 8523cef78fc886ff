"""The `finetune` command: parse, validate, dispatch. Heavy libraries load only inside the commands that need them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.errors import FinetuneError


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    misplaced = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra and (misplaced != extra or not hasattr(args, "overrides")):
        parser().error(f"unrecognized arguments: {' '.join(extra)}")
    if misplaced:  # overrides written after an option, e.g. `run RECIPE --resume lora.r=8`
        args.overrides += misplaced
    try:
        return args.command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune", description="QLoRA fine-tuning of Mixtral-style MoE models.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: its stages in order, then the export")
    run.add_argument("recipe", type=Path)
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys (validated)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in output_dir: finished stages are kept, the current one continues "
                            "from its last complete checkpoint (a folder without a run starts one)")
    again.add_argument("--overwrite", action="store_true", help="delete output_dir's previous run and start over")
    run.set_defaults(command=cmd_run)

    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("overrides", nargs="*", metavar="key.sub=value")
    validate.set_defaults(command=cmd_validate)

    data = sub.add_parser("data", help="prepare a recipe's data (cached) and show stats and examples, trained "
                                       "tokens marked")
    data.add_argument("recipe", type=Path)
    data.add_argument("overrides", nargs="*", metavar="key.sub=value")
    data.add_argument("--stage", choices=["sft", "dpo"], help="only this stage's data (default: every stage's)")
    data.add_argument("--examples", type=at_least(0), default=3, metavar="N",
                      help="training examples to show (default 3; 0: the stats alone)")
    data.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                      help="mark trained tokens in green (auto: when printing to a terminal) or between ⟦ ⟧")
    data.set_defaults(command=cmd_data)

    gen = sub.add_parser("generate", help="answer a prompt with an export folder or a run folder")
    gen.add_argument("target", type=Path, help="an export folder, or a run folder (base + final adapter)")
    gen.add_argument("--prompt", type=not_blank, required=True)
    gen.add_argument("--system", default=None, help="an optional system prompt")
    gen.add_argument("--max-new-tokens", type=at_least(1), default=64)
    gen.add_argument("--temperature", type=temperature, default=0.0, help="0 decodes greedily")
    gen.set_defaults(command=cmd_generate)

    chat = sub.add_parser("chat", help="talk to an export folder or a run folder; /reset clears, /exit ends")
    chat.add_argument("target", type=Path, help="an export folder, or a run folder (base + final adapter)")
    chat.add_argument("--system", default=None, help="an optional system prompt")
    chat.add_argument("--max-new-tokens", type=at_least(1), default=256)
    chat.add_argument("--temperature", type=temperature, default=0.0, help="0 decodes greedily")
    chat.set_defaults(command=cmd_chat)

    export = sub.add_parser("export", help="merge a finished run's adapter into the base (or write the adapter "
                                           "alone), then verify the result with stock transformers")
    export.add_argument("run_dir", type=Path, metavar="RUN")
    export.add_argument("--adapter-only", action="store_true", help="write the adapter alone (stock peft format)")
    # each left out is the run's own recipe setting (export.KEY in RUN/recipe.yaml), so a re-export makes what the
    # run made; None also lets --adapter-only refuse the two merge settings, which it would not use
    export.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="the weights' dtype (default: the run's export.dtype)")
    export.add_argument("--base", choices=["original", "dequantized"], default=None,
                        help="merge into the base checkpoint's weights (original), or into the 4-bit weights as "
                             "trained (default: the run's export.base)")
    export.add_argument("--max-shard-size", type=export_setting("max_shard_size", "a size such as 5GB or 500MB"),
                        default=None, help="largest shard, e.g. 5GB or 500MB (default: the run's export.max_shard_size)")
    export.add_argument("--tolerance", type=export_setting("verify_tolerance", "a finite number > 0"), default=None,
                        help="largest allowed |logit difference| to base+adapter, > 0 (default: the run's "
                             "export.verify_tolerance; unset there, by dtype: float32 1e-3, in 16 bits 35%% of how "
                             "far the adapter moves the logits)")
    export.add_argument("--out", type=Path, default=None,
                        help="default: RUN/export or RUN/export-adapter; replaced by the new export, so it must be "
                             "new, empty or an earlier export, and (but for those defaults) outside the run folder")
    export.set_defaults(command=cmd_export)

    report = sub.add_parser("report", help="plot a run's losses, learning rate, grad norm, DPO rewards, eval "
                                           "metrics and expert load: PNG files and one HTML page")
    report.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder (the recipe's output_dir)")
    report.add_argument("--out", type=Path, default=None, help="where to write (default RUN/report)")
    report.set_defaults(command=cmd_report)

    # its options belong to finetune.bench (python -m finetune.bench takes the same), parsed there, so that
    # `finetune --help` does not import torch; no prefix chars here, so "--x" reaches that parser untouched
    bench = sub.add_parser("bench", add_help=False, prefix_chars="+", help="QLoRA training speed and memory of Mixtral-8x7B on one GPU: "
                                                         "our 4-bit grouped experts vs a naive path (see --help)")
    bench.add_argument("bench_args", nargs="*")
    bench.set_defaults(command=cmd_bench)
    return p


def at_least(low: int, why: str = ""):
    """An integer option's type that refuses values below `low` when parsing, before anything loads; `why` is
    said with the refusal."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more{why}, got {value}")
        return value

    return integer


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be 0 (greedy) or a positive number")
    return value


def not_blank(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give the text to answer")
    return text


def export_setting(key: str, expected: str):
    """An export option's type: the rule of the same recipe key (export.KEY) in the schema, not a copy of it."""
    def value(text: str):
        from pydantic import ValidationError

        from finetune.recipe.schema import ExportSpec

        try:
            return getattr(ExportSpec.model_validate({key: text}), key)
        except ValidationError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected} (as the recipe key export.{key})") \
                from None

    return value


def cmd_validate(args) -> int:
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from finetune.secrets import refuse_secrets

    refuse_secrets(recipe.model_dump(mode="json"), str(args.recipe))
    print(f"{args.recipe}: ok ({len(recipe.stages)} stage(s): {', '.join(s.type for s in recipe.stages)})")
    return 0


def cmd_report(args) -> int:
    from finetune.report import write_report

    page = write_report(args.run_dir, args.out)
    print(f"report: {page}")
    for png in sorted(page.parent.glob("*.png")):
        print(f"  {png}")
    return 0


def cmd_data(args) -> int:
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.stage and getattr(recipe.data, args.stage) is None:  # said before the tokenizer loads
        raise FinetuneError(f"--stage {args.stage}: {args.recipe} has no data.{args.stage} section")
    from finetune.data.prepare import prepare
    from finetune.data.report import preview
    from finetune.pipeline import load_tokenizer

    tokenizer = load_tokenizer(recipe.model.tokenizer)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for stage in [args.stage] if args.stage else [s for s in ("sft", "dpo") if getattr(recipe.data, s)]:
        prepared = prepare(recipe, tokenizer, stage)
        print(prepared.summary())
        shown = preview(prepared, tokenizer, args.examples, color)
        print(shown + "\n" if shown else "")
    return 0


def cmd_run(args) -> int:
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from finetune.pipeline import run

    from finetune.stages.common import StopRequested

    try:
        run(recipe, resume=args.resume, overwrite=args.overwrite)
    except StopRequested as e:
        print(f"error: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a process killed by it would report
    return 0


def cmd_bench(args) -> int:
    from finetune.bench import main as bench_main

    return bench_main(args.bench_args)


def cmd_export(args) -> int:
    from finetune.export import RunFiles, export_adapter, export_merged

    if args.adapter_only and (args.base or args.max_shard_size):
        given = " and ".join(o for o, v in (("--base", args.base), ("--max-shard-size", args.max_shard_size)) if v)
        raise FinetuneError(f"{given}: settings of the merged export; --adapter-only writes the adapter alone")
    run = RunFiles.read(args.run_dir)
    given = {"dtype": args.dtype, "base": args.base, "max_shard_size": args.max_shard_size,
             "verify_tolerance": args.tolerance}
    if args.adapter_only:
        del given["base"], given["max_shard_size"]
    settings = run.export_settings(given)
    if args.adapter_only:
        out = args.out or args.run_dir / "export-adapter"
        record = export_adapter(run, out, dtype=settings.dtype, tolerance=settings.verify_tolerance)
    else:
        out = args.out or args.run_dir / "export"
        record = export_merged(run, out, dtype=settings.dtype, base=settings.base,
                               max_shard_size=settings.max_shard_size, tolerance=settings.verify_tolerance)
    print(f"exported to {out} (verified: max |logit difference| {record['max_abs_logit_difference']:.3g})")
    return 0


def cmd_chat(args) -> int:
    from finetune.generate import chat

    chat(args.target, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def cmd_generate(args) -> int:
    from finetune.generate import generate

    generate(args.target, args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
