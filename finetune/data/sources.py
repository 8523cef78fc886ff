"""Read a data source (a local JSON Lines, JSON, Parquet or CSV file, or a hub dataset) into a table of raw rows.

Rows are not judged here: a line that is not valid UTF-8 or JSON is kept with its problem noted, so that the
tokenizing step can fail on it or count it, and every row keeps its number in the file for error messages.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.data.formats import MESSAGE_FIELDS, TOO_NESTED, BadRow, json_messages
from finetune.errors import FinetuneError
from finetune.recipe.schema import SPLIT, DataSource

if TYPE_CHECKING:
    from datasets import Dataset

JSON_COLUMN, ROW_COLUMN, ERROR_COLUMN = "_json", "_row", "_error"
DETECT_ROWS = 200  # rows of a JSON source read to tell its format


class DataError(FinetuneError, ValueError):
    """Input data that cannot be used, naming the source and the row."""


@dataclass
class SourceRows:
    """A source's rows as a datasets.Dataset: the source's own columns, or one column of JSON text per row
    (`_json`), plus each row's number in the file (`_row`) and a problem found while reading it (`_error`)."""

    source: DataSource
    rows: Dataset
    unit: str  # "line" for line-numbered files (JSON Lines, CSV), "row" otherwise
    keys: list[str]  # the fields seen, to tell the format from
    total: int | None = None  # the rows before the split's slice, when known

    def locate(self, number: int) -> str:
        return locate(self.source.name, self.unit, number)

    def empty_reason(self) -> str:
        """Why the source gives no rows: its split's slice, or nothing there."""
        split = self.source.split
        if self.total:
            return f"split '{split}' selects 0 of its {self.total} rows"
        if self.source.path is not None:
            return "empty file: it holds no rows"
        return f"split '{split}' selects no rows" if "[" in split else "it holds no rows"  # datasets sliced it


def locate(name: str, unit: str, number: int) -> str:
    return f"{name}:{number}" if unit == "line" else f"{name} row {number}"


@dataclass
class OpenedSource:
    """A source identified by its content: a local file's bytes hash, or a loaded hub dataset's fingerprint."""

    source: DataSource
    fingerprint: str
    key: str  # the source's dotted key in the recipe, e.g. data.sft.sources.0
    hub_rows: Dataset | None = None


def open_source(source: DataSource, key: str) -> OpenedSource:
    if source.hub is not None:
        import datasets

        try:
            rows = datasets.load_dataset(source.hub, source.subset, split=source.split)
        except (OSError, ValueError) as e:  # not found, not reachable (offline), no such subset or split
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{key}.hub: cannot load {source.name}: {reason}") from None
        return OpenedSource(source, f"{source.name}@{rows._fingerprint}", key, rows)
    h = hashlib.sha256()
    try:
        with open(source.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:  # removed or unreadable since the recipe was checked
        raise DataError(f"{key}.path: cannot read {source.path}: {e.strerror or e}") from None
    return OpenedSource(source, h.hexdigest(), key)


def read_source(opened: OpenedSource) -> SourceRows:
    source = opened.source
    if opened.hub_rows is not None:
        return _from_table(source, opened.hub_rows, unit="row")
    path = Path(source.path)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != opened.fingerprint:  # the cache key must describe what was read
        raise DataError(f"{path}: the file changed while it was being read; run again")
    if path.suffix == ".parquet":
        return _from_table(source, _parquet_rows(data, path, opened.key), unit="row", slice_split=True)
    data = data.removeprefix(codecs.BOM_UTF8)  # as Excel and some Windows editors start UTF-8 text
    if path.suffix == ".jsonl":
        return _from_json_rows(source, _jsonl_rows(data), unit="line")
    if path.suffix == ".json":
        return _from_json_rows(source, _json_array_rows(data, path), unit="row")
    return _from_json_rows(source, _csv_rows(data, _message_columns(source)), unit="line")


def _parquet_rows(data: bytes, path: Path, key: str) -> Dataset:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    try:
        return Dataset(pq.read_table(io.BytesIO(data)))
    except pa.ArrowException as e:
        reason = str(e).removeprefix("Could not open Parquet input source '<Buffer>': ")
        raise DataError(f"{key}.path: {path} cannot be read as Parquet (truncated, or not a Parquet file): "
                        f"{reason}") from None


def _from_table(source: DataSource, table: Dataset, unit: str, slice_split: bool = False) -> SourceRows:
    numbers = list(range(1, len(table) + 1))
    total = len(numbers) if slice_split else None
    if slice_split:
        numbers = _slice(numbers, source.split)
        table = table.select([n - 1 for n in numbers])
    table = table.add_column(ROW_COLUMN, numbers).add_column(ERROR_COLUMN, [""] * len(numbers))
    keys = [c for c in table.column_names if c not in (ROW_COLUMN, ERROR_COLUMN)]
    return SourceRows(source, table, unit, keys, total)


def _from_json_rows(source: DataSource, rows: Iterator[tuple[int, str, str]], unit: str) -> SourceRows:
    """Rows as (number, JSON text, problem); the text is parsed again where the row is tokenized."""
    from datasets import Dataset

    every = list(rows)
    rows = _slice(every, source.split)
    keys: dict[str, None] = {}
    for _, text, error in rows[:DETECT_ROWS]:
        if not error:
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, RecursionError):  # the row is judged (and reported) when tokenized
                continue
            keys.update(dict.fromkeys(value) if isinstance(value, dict) else {})
    table = Dataset.from_dict({
        JSON_COLUMN: [text for _, text, _ in rows],
        ROW_COLUMN: [number for number, _, _ in rows],
        ERROR_COLUMN: [error for _, _, error in rows],
    })
    return SourceRows(source, table, unit, list(keys), len(every))


def _jsonl_rows(data: bytes) -> Iterator[tuple[int, str, str]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8"), ""
        except UnicodeDecodeError as e:
            yield number, "", f"invalid_utf8: not valid UTF-8 ({e.reason} at byte {e.start} of the line)"


def _json_array_rows(data: bytes, path: Path) -> Iterator[tuple[int, str, str]]:
    # Decoding with surrogateescape keeps a bad byte inside its row, so the row, not the file, is reported.
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _invalid_json(path, e.lineno, e) from None
    except RecursionError:  # as a file that is not valid JSON, the whole file (a .jsonl file loses only the row)
        raise DataError(f"{path}: a row is {TOO_NESTED} (use .jsonl to have such rows reported one by one)") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json file must hold a list of rows, it holds a {type(value).__name__}")
    for number, item in enumerate(value, start=1):
        yield _json_item_row(number, item)


def _invalid_json(path: Path, line: int, e: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{line}: not valid JSON ({e.msg}, column {e.colno}); a .json file holds one list of "
                     "rows (use .jsonl for one row per line)")


def _json_item_row(number: int, item) -> tuple[int, str, str]:
    text = json.dumps(item, ensure_ascii=False)
    if _has_bad_bytes(text):
        return number, "", "invalid_utf8: not valid UTF-8"
    return number, text, ""


def _message_columns(source: DataSource) -> set[str]:
    """The columns whose cells may hold a list of messages (after the source's renames)."""
    return {source.columns.get(field, field) for field in MESSAGE_FIELDS}


def _csv_rows(data: bytes, message_columns: set[str]) -> Iterator[tuple[int, str, str]]:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""))
    line = 1  # the header
    for record in reader:
        number, line = line + 1, reader.line_num  # a quoted cell can span lines: a row starts after the last one
        if None in record:
            columns = len(reader.fieldnames)
            yield number, "", f"wrong_type: {columns + len(record[None])} cells for {columns} columns"
            continue
        try:
            text = json.dumps({k: _csv_cell(k, v, message_columns) for k, v in record.items()}, ensure_ascii=False)
        except BadRow as e:
            yield number, "", f"{e.reason}: {e}"
            continue
        if _has_bad_bytes(text):
            yield number, "", "invalid_utf8: not valid UTF-8"
        else:
            yield number, text, ""


def _csv_cell(column: str, text: str, message_columns: set[str]):
    """A CSV cell as the value a JSON row would hold: an empty cell is a missing value (a CSV cannot tell them
    apart), and in a column that may hold messages, a list of role/content messages written as JSON text is that
    list (a cell holds only text). Other cells, and strings in the other file types, stay the text someone wrote
    (an output quoting an API payload, say)."""
    if text == "":
        return None
    if column not in message_columns:
        return text
    try:
        messages = json_messages(text)
    except BadRow as e:
        raise BadRow(e.reason, f"'{column}': {e}") from None
    return text if messages is None else messages


def _has_bad_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _slice(items: list, split: str) -> list:
    """Apply a split's slice ('train[:100]', 'train[10%:50%]') to a local file's rows."""
    match = SPLIT.fullmatch(split)

    def bound(text: str | None, default: int) -> int:
        if text is None:
            return default
        if text.endswith("%"):
            return round(int(text[:-1]) * len(items) / 100)
        return int(text)

    return items[bound(match["start"], 0):bound(match["stop"], len(items))]

