"""Row formats: what a row holds (chat messages, prompt/completion, instruction, preference) turned into messages.

Pure functions of one row (a dict). Every problem raises `BadRow` with a reason that dropped rows are counted by;
the conversation rules themselves (roles, turn order, empty messages) are checked by `chat.py` when tokenizing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from finetune.data.chat import ROLES
from finetune.recipe.schema import FORMAT_FIELDS

# Why a row was not used, in the order reports list them.
REASONS = {
    "invalid_utf8": "not valid UTF-8",
    "invalid_json": "not valid JSON",
    "too_nested": "nested too deeply to read",
    "not_an_object": "not an object with named fields",
    "missing_field": "a required field is missing",
    "wrong_type": "a field has the wrong type",
    "unexpected_field": "a message has fields besides role and content",
    "unknown_role": "a message has an unknown role",
    "wrong_turn_order": "turns are not system?, user, assistant, user, ... in order",
    "empty_message": "a message is empty",
    "identical_pair": "chosen and rejected are the same reply",
    "control_token": "a preference message holds a control token's text (such as </s>), which trl would encode "
                     "as the token itself",
    "no_trainable_tokens": "no token left to train on",
    "too_long": "longer than max_seq_len",
}
# The fields that may hold a list of messages (the others are text).
MESSAGE_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")
TOO_NESTED = "nested too deeply to read (JSON more than about 1000 levels deep)"


class BadRow(ValueError):
    """A row that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def detect_format(keys: Iterable[str], columns: Mapping[str, str]) -> str | None:
    """The row format that a source's column names show (after `columns` renames them), or None."""
    present = set(keys)
    fields = {field for field in _all_fields() if columns.get(field, field) in present}
    if "messages" in fields:
        return "messages"
    if {"chosen", "rejected"} <= fields:
        return "preference"
    if {"instruction", "output"} <= fields:
        return "instruction"
    if {"prompt", "completion"} <= fields:
        return "prompt_completion"
    return None


def sft_messages(row: Mapping, row_format: str, columns: Mapping[str, str]) -> tuple[list[dict], int]:
    """A chat, prompt/completion or instruction row as the messages of one training conversation, and how many of
    its first messages are the prompt: context whose assistant turns are not trained. A prompt/completion row trains
    its completion only (trl's completion_only_loss); a chat row trains every assistant turn."""
    if row_format == "messages":
        messages = _message_list(_field(row, "messages", columns), _column("messages", columns))
        return _with_system(row, columns, messages), 0
    if row_format == "prompt_completion":
        prompt = _with_system(row, columns, _turns(row, "prompt", columns, "user"))
        completion = _turns(row, "completion", columns, "assistant")
        if not completion:  # else a prompt ending with an assistant turn would be trained as if it were the reply
            raise BadRow("missing_field", f"'{_column('completion', columns)}' holds no message")
        return prompt + completion, len(prompt)
    if row_format == "instruction":
        instruction = _text(row, "instruction", columns)
        extra = _field(row, "input", columns, required=False)
        if extra is not None and not isinstance(extra, str):
            raise BadRow("wrong_type", f"'{_column('input', columns)}' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", columns)}]
        messages = _with_system(row, columns, messages)
        return messages, len(messages) - 1
    raise ValueError(f"not an SFT row format: {row_format!r}")


def preference_messages(row: Mapping, columns: Mapping[str, str]) -> tuple[list[dict], list[dict], list[dict]]:
    """A preference row as trl's conversational form: the prompt messages, one chosen and one rejected reply."""
    prompt = _turns(row, "prompt", columns, "user")
    chosen = _reply(row, "chosen", columns, prompt)
    rejected = _reply(row, "rejected", columns, prompt)
    if _given(chosen) == _given(rejected):
        raise BadRow("identical_pair", "'chosen' and 'rejected' are the same reply: the pair teaches nothing")
    return _with_system(row, columns, prompt), chosen, rejected


def _all_fields() -> set[str]:
    return {field for fields in FORMAT_FIELDS.values() for field in fields}


def _column(field: str, columns: Mapping[str, str]) -> str:
    return columns.get(field, field)


def _field(row: Mapping, field: str, columns: Mapping[str, str], required: bool = True):
    column = _column(field, columns)
    value = row.get(column)
    if value is None and required:
        named = f"'{column}'" + (f" (the {field} field)" if column != field else "")
        raise BadRow("missing_field", f"missing field {named}")
    return value


def _text(row: Mapping, field: str, columns: Mapping[str, str]) -> str:
    value = _field(row, field, columns)
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"'{_column(field, columns)}' must be a string, got {type(value).__name__}")
    return value


def _turns(row: Mapping, field: str, columns: Mapping[str, str], role: str) -> list[dict]:
    """A text (one message with `role`) or a list of messages (a CSV cell's JSON text is decoded when read)."""
    value = _field(row, field, columns)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _message_list(value, _column(field, columns))


def _message_list(value, column: str) -> list[dict]:
    if isinstance(value, str):
        decoded = json_messages(value)
        if decoded is None:
            raise BadRow("wrong_type", f"'{column}' must be a list of messages, got a string that is not one")
        value = decoded
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"'{column}' must be a list of messages, got {type(value).__name__}")
    return value


def json_messages(text: str) -> list | None:
    """A list of role/content messages written as JSON text, or None when the text is not one."""
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    except RecursionError:
        raise BadRow("too_nested", f"a list of messages written as JSON text is {TOO_NESTED}") from None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    return None


def _with_system(row: Mapping, columns: Mapping[str, str], messages: list[dict]) -> list[dict]:
    system = _field(row, "system", columns, required=False)
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise BadRow("wrong_type", f"'{_column('system', columns)}' must be a string, got {type(system).__name__}")
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        if messages[0].get("content") == system:  # datasets that keep the system prompt in both places
            return messages
        raise BadRow("wrong_turn_order", "the row has both a system column and a system message, and they differ")
    return [{"role": "system", "content": system}, *messages]


def _reply(row: Mapping, field: str, columns: Mapping[str, str], prompt: list[dict]) -> list[dict]:
    """One assistant message; a whole conversation that repeats the prompt is cut down to its reply."""
    messages = _turns(row, field, columns, "assistant")
    column = _column(field, columns)
    if _given(messages[: len(prompt)]) == _given(prompt):
        messages = messages[len(prompt):]
    if not messages:
        raise BadRow("missing_field", f"'{column}' holds the prompt but no reply")
    if len(messages) != 1:
        raise BadRow("wrong_turn_order", f"'{column}' must be one assistant reply (or the prompt and one reply), "
                                         f"it has {len(messages)} messages after the prompt")
    if not isinstance(messages[0], dict):
        raise BadRow("wrong_type", f"'{column}' must hold a message, got {type(messages[0]).__name__}")
    role = messages[0].get("role")
    if role != "assistant":
        reason = "wrong_turn_order" if role in ROLES else "unknown_role"
        raise BadRow(reason, f"'{column}' must be an assistant reply, got role {role!r}")
    return [messages[0]]  # as given: the conversation check names any key beyond role and content


def _given(messages: list) -> list:
    """Messages without the keys datasets fill with None (a Parquet or hub column of messages holds the union of
    every row's keys), for comparing what two of them say."""
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
