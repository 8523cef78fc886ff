"""The `finetune` command: parse, validate, dispatch. Heavy libraries load only inside the commands that need them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.errors import FinetuneError


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
    run.set_defaults(command=cmd_run)

    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("overrides", nargs="*", metavar="key.sub=value")
    validate.set_defaults(command=cmd_validate)

    gen = sub.add_parser("generate", help="answer a prompt with an export folder or a run folder")
    gen.add_argument("target", type=Path, help="an export folder, or a run folder (base + final adapter)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None, help="an optional system prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    gen.set_defaults(command=cmd_generate)
    return p


def cmd_validate(args) -> int:
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok ({len(recipe.stages)} stage(s): {', '.join(s.type for s in recipe.stages)})")
    return 0


def cmd_run(args) -> int:
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from finetune.pipeline import run

    run(recipe)
    return 0


def cmd_generate(args) -> int:
    from finetune.generate import generate

    generate(args.target, args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
