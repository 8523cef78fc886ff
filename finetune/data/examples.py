"""Rows in, training examples out: tokenized chat for SFT, normalized conversations for DPO."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from finetune.data.chat import tokenize_conversation, tokenize_prompt
from finetune.data.sources import DataError, Row


@dataclass
class Examples:
    rows: list[dict]
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"{len(self.rows)} examples, dropped: {drops}"


def sft_examples(rows: list[Row], tokenizer, max_seq_len: int, train_on_prompt: bool) -> Examples:
    """Chat rows ({"messages": [...]}) to input_ids with a completion_mask marking the trained tokens."""
    out = Examples([])
    for row in rows:
        messages = _messages(row, "messages")
        try:
            example = tokenize_conversation(messages, tokenizer, train_on_prompt=train_on_prompt)
        except ValueError as e:
            raise DataError(f"{row.source}:{row.number}: {e}") from None
        if len(example["input_ids"]) > max_seq_len:
            out.dropped[f"longer than max_seq_len={max_seq_len}"] += 1
            continue
        out.rows.append(example)
    return out


def preference_examples(rows: list[Row], tokenizer, max_seq_len: int) -> Examples:
    """Preference rows to trl's conversational form: prompt messages, one chosen and one rejected reply."""
    out = Examples([])
    for row in rows:
        prompt = _as_messages(row, "prompt", "user")
        chosen = _reply(row, "chosen", prompt)
        rejected = _reply(row, "rejected", prompt)
        try:
            prompt_len = len(tokenize_prompt(prompt, tokenizer))
            longest = max(len(tokenizer.encode(r[0]["content"], add_special_tokens=False)) for r in (chosen, rejected))
        except ValueError as e:
            raise DataError(f"{row.source}:{row.number}: {e}") from None
        if prompt_len + longest + 1 > max_seq_len:
            out.dropped[f"longer than max_seq_len={max_seq_len}"] += 1
            continue
        out.rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _messages(row: Row, key: str) -> list[dict]:
    value = row.data.get(key)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise DataError(f"{row.source}:{row.number}: '{key}' must be a list of {{role, content}} messages")
    return value


def _as_messages(row: Row, key: str, role: str) -> list[dict]:
    value = row.data.get(key)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(row, key)


def _reply(row: Row, key: str, prompt: list[dict]) -> list[dict]:
    """A single assistant message; a full conversation that repeats the prompt is cut down to its reply."""
    messages = _as_messages(row, key, "assistant")
    if messages[: len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if len(messages) != 1 or messages[0].get("role") != "assistant" or not str(messages[0].get("content", "")).strip():
        raise DataError(f"{row.source}:{row.number}: '{key}' must be one non-empty assistant reply")
    return messages
