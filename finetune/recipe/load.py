"""Read a recipe file, apply command-line overrides, validate, and explain every problem at once.

Each error names the file, the line and the dotted key, with a "did you mean" for near-miss keys.
Only pydantic and PyYAML are imported here, so `finetune validate` is instant.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import FinetuneError
from finetune.recipe.schema import STAGE_TYPES, Recipe

KeyPath = tuple[str | int, ...]


class RecipeError(FinetuneError, ValueError):
    """A recipe that cannot be used; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Override:
    path: KeyPath
    value: Any
    text: str


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Parse, override and validate a recipe; raise RecipeError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(str(path), [f"cannot read the recipe: {e}"]) from None
    data, lines = _parse_yaml(text, path)
    parsed = [_parse_override(o, str(path)) for o in overrides]
    for o in parsed:
        _apply(data, o, str(path))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        origins = {o.path: o.text for o in parsed}
        raise RecipeError(str(path), [_explain(err, path, lines, origins) for err in e.errors()]) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every key, defaults included."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _parse_yaml(text: str, path: Path) -> tuple[dict, dict[KeyPath, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(str(path), [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"{path}:1: a recipe is a mapping of keys, got {type(data).__name__}"])
    lines: dict[KeyPath, int] = {}
    _record_lines(node, (), lines)
    return data, lines


def _record_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _record_lines(value, prefix + (key.value,), lines)
            lines[prefix + (key.value,)] = key.start_mark.line + 1  # the key's line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, prefix + (i,), lines)


def _parse_override(text: str, source: str) -> Override:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(source, [f"override '{text}': expected key.sub=value"])
    path = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return Override(path, value, text)


def _apply(data: dict, override: Override, source: str) -> None:
    node: Any = data
    for i, part in enumerate(override.path[:-1]):
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            where = ".".join(map(str, override.path[: i + 1]))
            raise RecipeError(source, [f"override '{override.text}': {where} does not exist"])
        if not isinstance(node, dict | list):
            where = ".".join(map(str, override.path[: i + 1]))
            raise RecipeError(source, [f"override '{override.text}': {where} is a value, not a section"])
    last = override.path[-1]
    if isinstance(node, list) and not (isinstance(last, int) and last < len(node)):
        raise RecipeError(source, [f"override '{override.text}': index {last} is out of range"])
    node[last] = override.value


def _explain(err: dict, path: Path, lines: dict[KeyPath, int], overrides: dict[KeyPath, str]) -> str:
    loc = _data_loc(err["loc"])
    dotted = ".".join(map(str, loc)) or "(top level)"
    origin = next((f"override '{t}'" for p, t in overrides.items() if loc[: len(p)] == p), None)
    if origin is None:
        origin = f"{path}:{_nearest_line(loc, lines)}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _did_you_mean(loc)
    elif err["type"] == "missing":
        message = "required key is missing"
    return f"{origin}: {dotted}: {message}"


def _data_loc(loc: tuple) -> KeyPath:
    """pydantic puts the stage's tag ('sft', 'dpo') into the location; the recipe has no such key."""
    if len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[1], int) and loc[2] in STAGE_TYPES:
        return (*loc[:2], *loc[3:])
    return tuple(loc)


def _nearest_line(loc: KeyPath, lines: dict[KeyPath, int]) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def _did_you_mean(loc: KeyPath) -> str:
    allowed = _allowed_keys(Recipe, loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else (f"; allowed here: {', '.join(sorted(allowed))}" if allowed else "")


def _allowed_keys(model: type[BaseModel], loc: KeyPath) -> list[str]:
    """The keys that the schema accepts at a location, following sections, lists and the stage union."""
    candidates: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for c in candidates:
            for t in _unwrap(c):
                if isinstance(part, int) and typing.get_origin(t) is list:
                    nxt.extend(typing.get_args(t))
                elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
                    nxt.append(t.model_fields[part].annotation)
        candidates = nxt
    keys: set[str] = set()
    for c in candidates:
        for t in _unwrap(c):
            if isinstance(t, type) and issubclass(t, BaseModel):
                keys.update(t.model_fields)
    return sorted(keys)


def _unwrap(annotation: Any) -> list[Any]:
    """Flatten Optional, unions and Annotated into the plain types they allow."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]
