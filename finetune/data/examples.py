"""Raw rows in, training examples out: the batched functions that datasets' `map` runs in each worker.

A row that cannot be used comes out empty, with a `reason` (one of formats.REASONS) and a `detail` that says what
is wrong; the caller decides whether that stops the run or is counted.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from finetune.data.chat import ConversationError, tokenize_conversations
from finetune.data.formats import TOO_NESTED, BadRow, preference_messages, sft_messages
from finetune.data.sources import ERROR_COLUMN, JSON_COLUMN, ROW_COLUMN

if TYPE_CHECKING:
    from datasets import Features


def sft_features() -> Features:
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value("int32")), "completion_mask": List(Value("int8")), **_status_features(),
    })


def preference_features() -> Features:
    from datasets import Features, List, Value

    messages = List({"role": Value("string"), "content": Value("string")})
    return Features({
        "prompt": messages, "chosen": messages, "rejected": messages, **_status_features(),
    })


def _status_features() -> dict:
    from datasets import Value

    return {"row": Value("int64"), "reason": Value("string"), "detail": Value("string"), "truncated": Value("bool"),
            "length": Value("int32"), "trained": Value("int32")}


def sft_examples(batch: dict[str, list], *, row_format: str, columns: dict, tokenizer, max_seq_len: int,
                 on_too_long: str, train_on_prompt: bool) -> dict[str, list]:
    """Chat, prompt/completion or instruction rows to `input_ids` and a `completion_mask` of the trained tokens: every
    assistant turn of a chat row, the completion of a prompt/completion row (all but "<s>" with `train_on_prompt`)."""
    rows = _rows(batch)
    out: list[dict | None] = [None] * len(rows)
    conversations: list[tuple[int, tuple[list[dict], int]]] = []
    for index, row in enumerate(rows):
        try:
            conversations.append((index, sft_messages(raw_row(row), row_format, columns)))
        except BadRow as e:
            out[index] = _rejected(row, e.reason, str(e), sft=True)
    encoded = tokenize_conversations([m for _, (m, _) in conversations], tokenizer, train_on_prompt=train_on_prompt,
                                     prompt_lengths=[n for _, (_, n) in conversations])
    for (index, _), example in zip(conversations, encoded):
        out[index] = _sft_example(rows[index], example, max_seq_len, on_too_long)
    return _columns(out)


def _sft_example(row: dict, example: dict | ConversationError, max_seq_len: int, on_too_long: str) -> dict:
    if isinstance(example, ConversationError):
        return _rejected(row, example.reason, str(example), sft=True)
    ids, mask = example["input_ids"], example["completion_mask"]
    length, truncated = len(ids), False
    if length > max_seq_len:
        if on_too_long != "truncate":
            return _rejected(row, "too_long", f"{length} tokens, max_seq_len is {max_seq_len}", sft=True, length=length)
        ids, mask, truncated = ids[:max_seq_len], mask[:max_seq_len], True
    if not any(mask):
        detail = f"the first {max_seq_len} of its {length} tokens (max_seq_len) hold none of the tokens it trains on"
        return _rejected(row, "no_trainable_tokens", detail, sft=True, length=length)
    return {"input_ids": ids, "completion_mask": mask,
            **_status(row, length=len(ids), truncated=truncated, trained=sum(mask))}


def preference_examples(batch: dict[str, list], *, columns: dict, tokenizer, max_seq_len: int,
                        on_too_long: str) -> dict[str, list]:
    """Preference rows to trl's conversational prompt/chosen/rejected, measured with the SFT encoding.

    With "truncate", trl cuts prompt + reply to max_seq_len when it tokenizes; a prompt that alone fills it (which
    trl would silently drop) is dropped here, counted.
    """
    rows = _rows(batch)
    out: list[dict | None] = [None] * len(rows)
    pairs: list[tuple[int, tuple[list[dict], list[dict], list[dict]]]] = []
    controls = [t for t in tokenizer.all_special_tokens if t]
    for index, row in enumerate(rows):
        try:
            messages = preference_messages(raw_row(row), columns)
            _refuse_control_text(messages, controls, columns)
            pairs.append((index, messages))
        except BadRow as e:
            out[index] = _rejected(row, e.reason, str(e), sft=False)
    encoded = tokenize_conversations([prompt + reply for _, (prompt, *replies) in pairs for reply in replies],
                                     tokenizer)
    for number, (index, messages) in enumerate(pairs):
        out[index] = _preference_example(rows[index], messages, encoded[2 * number:2 * number + 2], columns,
                                         max_seq_len, on_too_long)
    return _columns(out)


def _refuse_control_text(messages: tuple, controls: list[str], columns: dict) -> None:
    """trl tokenizes a preference row's rendered chat template, where the text "</s>" (HTML strike-through, say)
    becomes the end-of-sequence token itself: the model would learn to stop mid-reply. The SFT encoding, like
    mistral-common's, keeps it text; a preference row holding it is refused rather than trained differently."""
    prompt = messages[0]
    for field, turns, first in (("prompt", prompt, 0), ("chosen", messages[1], len(prompt)),
                                ("rejected", messages[2], len(prompt))):
        for number, message in enumerate(turns, first):  # numbered in prompt + reply, as the other problems are
            content = message.get("content")
            found = [t for t in controls if isinstance(content, str) and t in content]
            if found:
                raise BadRow("control_token", f"'{columns.get(field, field)}': message {number} "
                                              f"({message.get('role')}) holds the text {', '.join(found)}, which trl "
                                              "would encode as the control token")


def _preference_example(row: dict, messages: tuple, encoded: list, columns: dict, max_seq_len: int,
                        on_too_long: str) -> dict:
    problem = next(((side, e) for side, e in zip(("chosen", "rejected"), encoded)
                    if isinstance(e, ConversationError)), None)
    if problem is not None:
        side, error = problem
        # Each reply is checked after the prompt: name the field whose own message is wrong.
        if error.index is not None:
            field = side if error.index >= len(messages[0]) else "prompt"
            return _rejected(row, error.reason, f"'{columns.get(field, field)}': {error}", sft=False)
        return _rejected(row, error.reason, str(error), sft=False)
    lengths = [len(e["input_ids"]) for e in encoded]
    # the reply is the last run of trained tokens; the prompt is everything before it
    prompt_length = lengths[0] - _trailing_ones(encoded[0]["completion_mask"])
    length, truncated = max(lengths), False
    if length > max_seq_len:
        if on_too_long != "truncate":
            detail = f"prompt and longer reply are {length} tokens, max_seq_len is {max_seq_len}"
            return _rejected(row, "too_long", detail, sft=False, length=length)
        if prompt_length >= max_seq_len:
            detail = f"the prompt alone is {prompt_length} tokens, max_seq_len is {max_seq_len}"
            return _rejected(row, "no_trainable_tokens", detail, sft=False, length=length)
        truncated = True
    prompt, chosen, rejected = (_plain(m) for m in messages)
    trained = sum(min(n, max_seq_len) - prompt_length for n in lengths)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            **_status(row, length=min(length, max_seq_len), truncated=truncated, trained=trained)}


def raw_row(row: dict) -> dict:
    """The row's fields: parsed from its JSON text, or its own columns; BadRow for a problem found while reading."""
    if row.get(ERROR_COLUMN):
        reason, _, detail = row[ERROR_COLUMN].partition(": ")
        raise BadRow(reason, detail)
    if JSON_COLUMN not in row:
        return {key: value for key, value in row.items() if key not in (ROW_COLUMN, ERROR_COLUMN)}
    try:
        value = json.loads(row[JSON_COLUMN])
    except json.JSONDecodeError as e:
        raise BadRow("invalid_json", f"not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise BadRow("too_nested", TOO_NESTED) from None
    if not isinstance(value, dict):
        raise BadRow("not_an_object", f"a row must be a JSON object, got {type(value).__name__}")
    return value


def _status(row: dict, reason: str = "", detail: str = "", length: int = 0, truncated: bool = False,
            trained: int = 0) -> dict:
    return {"row": row[ROW_COLUMN], "reason": reason, "detail": detail, "truncated": truncated, "length": length,
            "trained": trained}


def _rejected(row: dict, reason: str, detail: str, sft: bool, length: int = 0) -> dict:
    empty = ({"input_ids": [], "completion_mask": []} if sft
             else {"prompt": [], "chosen": [], "rejected": []})
    return {**empty, **_status(row, reason, detail, length)}


def _rows(batch: dict[str, list]) -> list[dict]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def _trailing_ones(mask: list[int]) -> int:
    count = 0
    for bit in reversed(mask):
        if not bit:
            break
        count += 1
    return count


def _plain(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]
