"""The README's set-up and test commands are the ones CI runs, word for word."""

import re
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = REPO / "README.md"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert len(commands) == 2, commands
    blocks = readme.read_text().split("```bash\n")[1:]
    shown = [block.split("```")[0].strip() for block in blocks]
    assert commands[0] in shown, f"install command not in README: {commands[0]}"
    assert commands[1] in shown, f"test command not in README: {commands[1]}"
    assert "finetune run recipes/quickstart.yaml" in shown


def _reference_rows() -> list[tuple[list[str], list[str]]]:
    """The recipe reference table: (the key cell's backticked names, every backticked name in the row) per row."""
    section = (REPO / "README.md").read_text().split("## Recipe reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) > 30, "the recipe reference table was not found"
    return [(re.findall(r"`([^`]+)`", row.split(" | ")[0]), re.findall(r"`([^`]+)`", row)) for row in rows]


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf key of the recipe schema as a dotted path ('stages.beta', 'data.sft.sources.path')."""
    keys = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sections = _sections(field.annotation)
        keys |= set().union(*(_schema_keys(s, f"{path}.") for s in sections)) if sections else {path}
    return keys


def _sections(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [section for arg in get_args(annotation) for section in _sections(arg)]


def _matches(pattern: str, path: str) -> bool:
    """README paths write list items as `[]` and either stage's data as `*`."""
    pattern_parts, parts = pattern.replace("[]", "").split("."), path.split(".")
    return len(pattern_parts) == len(parts) and all(p in ("*", q) for p, q in zip(pattern_parts, parts))


def test_the_recipe_reference_names_every_key_and_no_other():
    from finetune.recipe.schema import Recipe

    rows = _reference_rows()
    keys = _schema_keys(Recipe)
    assert {"stages.beta", "data.sft.sources.path", "model.quantization.quant_type"} <= keys  # the walk goes deep

    def documented(key: str) -> bool:
        parent, _, name = key.rpartition(".")
        for key_cell, names in rows:
            # the row's own keys (a bare name is a sibling of the row's first key)
            if any(_matches(k if "." in k or "." not in key_cell[0] else f"{key_cell[0].rpartition('.')[0]}.{k}", key)
                   for k in key_cell):
                return True
            # a section described in one row names its keys in the row (`model.quantization`, `data.*.sources[]`)
            if parent and any(_matches(k, parent) for k in key_cell) and any(
                    n == name or n.startswith((f"{name}:", f"{name} ")) for n in names):
                return True
        return False

    assert [key for key in sorted(keys) if not documented(key)] == []
    # every key the table's first column names exists (a bare name is its row's first key's sibling)
    named = [f"{cell[0].rpartition('.')[0]}.{k}".lstrip(".") if "." not in k and "." in cell[0] else k
             for cell, _ in rows for k in cell]
    assert [k for k in named if not any(_matches(k, key) or any(_matches(k, key.rsplit(".", depth)[0])
                                                                 for depth in (1, 2)) for key in keys)] == []
