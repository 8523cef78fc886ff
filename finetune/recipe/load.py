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
    text = _read_text(path)
    data, lines, problems = _parse_yaml(text, path)
    parsed = [_parse_override(o, str(path)) for o in overrides]
    created = {o.path: _apply(data, o, str(path)) for o in parsed}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        origins = {o.path: (o.text, created[o.path]) for o in parsed}
        # _check_keys named every key of the file that YAML reads as true/false/a number, with its line
        errors = [err for err in e.errors()
                  if not (err["type"] == "invalid_key" and _override(_data_loc(err["loc"]), origins) is None)]
        problems += [_explain(err, path, lines, origins) for err in errors]
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every key, defaults included."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(str(path), [f"cannot read the recipe: {e}"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecipeError(str(path), [f"{path}:{line}: not UTF-8 text: byte 0x{raw[e.start]:02x} at column {column} "
                                      "(save the recipe as UTF-8)"]) from None


def _parse_yaml(text: str, path: Path) -> tuple[dict, dict[KeyPath, int], list[str]]:
    """The recipe's data, the line of every key, and the problems YAML itself lets pass (repeated keys...)."""
    try:
        loader = yaml.SafeLoader(text)  # reads the whole text at once: a control character fails here
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise RecipeError(str(path), [f"{path}:{line}: not valid YAML: control character #x{e.character:04x} "
                                      "(YAML allows no such character)"]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError(str(path), [f"{path}:1: the recipe is empty: give its keys"])
        problems = _check_keys(node, (), path, {})
        data = _unshared(loader.construct_document(node))
        lines: dict[KeyPath, int] = {}
        # after constructing, which flattens merge keys (<<) into the node in the order PyYAML reads them
        _record_lines(node, (), lines)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(str(path), [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    except RecursionError:  # PyYAML's parser recurses once per level of nesting
        where = f"{path}:{loader.get_mark().line + 1}"
        raise RecipeError(str(path), [f"{where}: nested too deeply to read"]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"{path}:1: a recipe is a mapping of keys, got {type(data).__name__}"])
    return data, lines, problems


# how a key that YAML 1.1 does not read as a string was read
KEY_TYPES = {"tag:yaml.org,2002:bool": "the boolean {value}", "tag:yaml.org,2002:null": "null",
             "tag:yaml.org,2002:int": "a number", "tag:yaml.org,2002:float": "a number",
             "tag:yaml.org,2002:timestamp": "a date"}
MERGE = "tag:yaml.org,2002:merge"  # '<<: *anchor' copies another mapping's keys in, which this mapping may override


def _check_keys(node: yaml.Node, prefix: KeyPath, path: Path, walked: dict[int, KeyPath | None]) -> list[str]:
    """Keys given twice (YAML keeps the last silently) and keys that YAML reads as something other than a word.

    An anchored mapping is checked once, where it is written, however often an alias repeats it; `walked` maps
    each node checked to its key path while it is being checked (an alias to it then would make it contain itself).
    """
    if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        return []
    if walked.get(id(node)) is not None:
        raise RecipeError(str(path), [f"{path}:{node.start_mark.line + 1}: {_dotted(walked[id(node)])}: an alias "
                                      f"at {_dotted(prefix)} repeats this inside itself, which never ends"])
    if id(node) in walked:
        return []
    walked[id(node)] = prefix
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if not isinstance(key, yaml.ScalarNode):
                problems.append(f"{path}:{line}: {_dotted(prefix)}: a key must be a plain word, not a list or mapping")
                continue
            dotted = _dotted(prefix + (key.value,))
            if key.tag == MERGE:
                # the merged mappings' keys land in this mapping, so they are named from here
                for source in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                    problems += _check_keys(source, prefix, path, walked)
                continue
            if key.tag != "tag:yaml.org,2002:str":
                read_as = KEY_TYPES.get(key.tag, key.tag).format(value=str(yaml.safe_load(key.value)).lower())
                problems.append(f"{path}:{line}: {dotted}: YAML reads the key {key.value!r} as {read_as}, not a "
                                f"word: quote it ('{key.value}':)")
            elif key.value in seen:
                problems.append(f"{path}:{line}: {dotted}: duplicate key (first on line {seen[key.value]}); "
                                "YAML would keep only the last")
            else:
                seen[key.value] = line
            problems += _check_keys(value, prefix + (key.value,), path, walked)
    else:
        for i, item in enumerate(node.value):
            problems += _check_keys(item, prefix + (i,), path, walked)
    walked[id(node)] = None
    return problems


def _dotted(loc: KeyPath) -> str:
    return ".".join(map(str, loc)) or "(top level)"


def _record_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines[prefix] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # reported by _check_keys
            _record_lines(value, prefix + (key.value,), lines)
            lines[prefix + (key.value,)] = key.start_mark.line + 1  # the key's line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, prefix + (i,), lines)


def _unshared(value: Any) -> Any:
    """A copy where no two places hold one object: an alias repeats its anchor's, and an override must change one."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _parse_override(text: str, source: str) -> Override:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(source, [f"override '{text}': expected key.sub=value"])
    path = tuple(int(p) if p.isascii() and p.isdigit() else p for p in key.strip().split("."))
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return Override(path, value, text)


def _apply(data: dict, override: Override, source: str) -> KeyPath:
    """Set the override's value; return the shortest path it added (its own path when it added no section)."""
    node: Any = data
    created = override.path
    for i, part in enumerate(override.path[:-1]):
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict):
            if str(part) not in node and created == override.path:
                created = override.path[: i + 1]
            node = node.setdefault(str(part), {})  # a digit names a list item; a mapping's keys are words
        else:
            where = ".".join(map(str, override.path[: i + 1]))
            raise RecipeError(source, [f"override '{override.text}': {where} does not exist"])
        if not isinstance(node, dict | list):
            where = ".".join(map(str, override.path[: i + 1]))
            raise RecipeError(source, [f"override '{override.text}': {where} is a value, not a section"])
    last = override.path[-1]
    if isinstance(node, list) and not (isinstance(last, int) and last < len(node)):
        raise RecipeError(source, [f"override '{override.text}': index {last} is out of range"])
    node[last if isinstance(node, list) else str(last)] = override.value
    return created


def _explain(err: dict, path: Path, lines: dict[KeyPath, int], overrides: dict[KeyPath, str]) -> str:
    loc = _data_loc(err["loc"])
    if err["type"] == "union_tag_invalid":  # pydantic names the stage; the bad value is its type key's
        loc += ("type",)
    dotted = _dotted(loc)
    origin = _override(loc, overrides) or f"{path}:{_nearest_line(loc, lines)}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _did_you_mean(err["loc"])
    elif err["type"] == "missing":
        message = "required key is missing"
    elif err["type"] in ("model_type", "model_attributes_type") and err["input"] is None:
        message = _empty_section(loc)
    elif err["type"] == "union_tag_invalid":
        message = f"expected {err['ctx']['expected_tags']}, got {err['ctx']['tag']!r}"
    elif err["type"] == "bool_type":
        message = f"expected true or false, got {err['input']!r}"
    elif err["type"] == "finite_number":
        message = f"must be a finite number, got {err['input']}"
    return f"{origin}: {dotted}: {message}"


def _override(loc: KeyPath, overrides: dict) -> str | None:
    """The override that set the value at loc, or added the section at loc; keys compare as text."""
    text = tuple(map(str, loc))
    for p, (t, created) in overrides.items():
        p, c = tuple(map(str, p)), tuple(map(str, created))
        if text[: len(p)] == p or (p[: len(text)] == text and text[: len(c)] == c):
            return f"override '{t}'"
    return None


def _empty_section(loc: KeyPath) -> str:
    """A null where a section belongs: never read as the defaults, since `lora: null` means no LoRA."""
    if loc and isinstance(loc[-1], int):
        return "the item is empty: give its keys"
    fix = "give its keys" if _required(loc) else "give its keys, or leave the key out for the defaults"
    return f"the section is empty (YAML reads a key with nothing under it as null): {fix}"


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


ARTICLE = {"sft": "an", "dpo": "a"}


def _did_you_mean(loc: tuple) -> str:
    """`loc` is pydantic's, with the stage's tag, so that a stage lists its own type's keys."""
    allowed = _allowed_keys(Recipe, loc[:-1])
    if len(loc) == 4 and loc[0] == "stages" and loc[2] in STAGE_TYPES:  # a key of another stage type
        owners = [t for t in STAGE_TYPES if t != loc[2] and loc[-1] in _allowed_keys(Recipe, (*loc[:2], t))]
        if owners:
            others = " or ".join(f"{ARTICLE[owner]} {owner}" for owner in owners)
            return f" for {ARTICLE[loc[2]]} {loc[2]} stage (only {others} stage has it)"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f"; allowed here: {', '.join(sorted(allowed))}" if allowed else ""


def _required(loc: KeyPath) -> bool:
    """Whether the schema requires the key at loc, so that leaving it out is no fix."""
    name = loc[-1] if loc else None
    return any(s.model_fields[name].is_required() for s in _sections(Recipe, loc[:-1]) if name in s.model_fields)


def _allowed_keys(model: type[BaseModel], loc: KeyPath) -> list[str]:
    """The keys that the schema accepts at a location, following sections, lists and the stage union."""
    return sorted({key for section in _sections(model, loc) for key in section.model_fields})


def _sections(model: type[BaseModel], loc: KeyPath) -> list[type[BaseModel]]:
    """The schema's sections that may sit at a location (several within the stage union)."""
    candidates: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for c in candidates:
            for t in _unwrap(c):
                if isinstance(part, int) and typing.get_origin(t) is list:
                    nxt.extend(typing.get_args(t))
                elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
                    nxt.append(t.model_fields[part].annotation)
                elif isinstance(t, type) and issubclass(t, BaseModel) and _tagged(t, part):
                    nxt.append(t)  # pydantic's tag for one member of the stage union
        candidates = nxt
    return [t for c in candidates for t in _unwrap(c) if isinstance(t, type) and issubclass(t, BaseModel)]


def _tagged(section: type[BaseModel], tag: object) -> bool:
    field = section.model_fields.get("type")
    return field is not None and typing.get_args(field.annotation) == (tag,)


def _unwrap(annotation: Any) -> list[Any]:
    """Flatten Optional, unions and Annotated into the plain types they allow."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]
