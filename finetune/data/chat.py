"""Mixtral-Instruct v0.1 conversations to token ids, exactly as mistral-common's v1 tokenizer encodes them.

mistral-common (`InstructTokenizerV1.encode_instruct`) starts with "<s>" and encodes each turn on its own: a user turn
as the text "[INST] {content} [/INST]" (the system prompt and a blank line before the first user's content), an
assistant turn as its text followed by "</s>". Each encode gets SentencePiece's dummy prefix, so encoding turn by turn
here, rather than one rendered string, is what makes the ids identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")


def tokenize_conversation(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, *, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """A training conversation (ending with an assistant turn) to `input_ids` and a `completion_mask`.

    The mask is 1 on each assistant turn's tokens and its closing "</s>", 0 on "<s>" and the "[INST] ... [/INST]"
    parts; with `train_on_prompt` it is 1 everywhere.
    """
    system_prompt, turns = _check_conversation(messages, last_role="assistant")
    input_ids = [tokenizer.bos_token_id]
    completion_mask = [0]
    for index, (role, content) in enumerate(turns):
        ids = _encode_turn(tokenizer, role, content, system_prompt if index == 0 else None)
        input_ids += ids
        completion_mask += [int(role == "assistant")] * len(ids)
    if train_on_prompt:
        completion_mask = [1] * len(input_ids)
    return {"input_ids": input_ids, "completion_mask": completion_mask}


def tokenize_prompt(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """A conversation ending with a user turn to the prompt ids, ending in "[/INST]", that generation continues."""
    system_prompt, turns = _check_conversation(messages, last_role="user")
    input_ids = [tokenizer.bos_token_id]
    for index, (role, content) in enumerate(turns):
        input_ids += _encode_turn(tokenizer, role, content, system_prompt if index == 0 else None)
    return input_ids


def _encode_turn(tokenizer: PreTrainedTokenizerBase, role: str, content: str, system_prompt: str | None) -> list[int]:
    if role == "assistant":
        return _encode_text(tokenizer, content) + [tokenizer.eos_token_id]
    if system_prompt is not None:
        content = f"{system_prompt}\n\n{content}"
    return _encode_text(tokenizer, f"[INST] {content} [/INST]")


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # mistral-common reads "<s>" or "</s>" inside a message as text, never as a control token.
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _check_conversation(
    messages: list[dict], last_role: Literal["user", "assistant"]
) -> tuple[str | None, list[tuple[str, str]]]:
    """The system prompt (or None) and the (role, content) turns; ValueError naming the first message that is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"a conversation must be a non-empty list of messages, got {messages!r:.80}")
    checked = [_check_message(index, message) for index, message in enumerate(messages)]
    system_prompt = checked[0][1] if checked[0][0] == "system" else None
    offset = int(system_prompt is not None)
    turns = checked[offset:]
    for position, (role, _) in enumerate(turns):
        index, expected = position + offset, ("user", "assistant")[position % 2]
        if role == "system":
            raise ValueError(f"message {index}: a system message is only allowed as the first message")
        if role != expected:
            raise ValueError(
                f"message {index}: expected role '{expected}', got '{role}'; turns must alternate user/assistant, "
                "starting with user (after an optional system message)"
            )
    if not turns:
        raise ValueError("the conversation has a system message but no user message")
    if turns[-1][0] != last_role:
        raise ValueError(f"the conversation must end with role '{last_role}', it ends with '{turns[-1][0]}'")
    return system_prompt, turns


def _check_message(index: int, message: object) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise ValueError(f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise ValueError(f"message {index}: missing key {' and '.join(map(repr, missing))}")
    # Datasets give every message the union of all keys, with None where absent: only set values are unexpected.
    unexpected = sorted(key for key, value in message.items() if key not in ("role", "content") and value is not None)
    if unexpected:
        raise ValueError(f"message {index}: unexpected keys {unexpected}; a message has only 'role' and 'content'")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"message {index}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {index} ({role}): content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise ValueError(f"message {index} ({role}): content is empty or only whitespace")
    return role, content
