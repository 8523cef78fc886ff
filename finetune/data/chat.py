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


class ConversationError(ValueError):
    """A conversation Mixtral-Instruct cannot encode; `reason` is a short category for counting dropped rows, and
    `index` the message at fault when the message alone is wrong (its type, keys, role or content)."""

    def __init__(self, reason: str, message: str, index: int | None = None):
        self.reason = reason
        self.index = index
        super().__init__(message)


def tokenize_conversation(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, *, train_on_prompt: bool = False
) -> dict[str, list[int]]:
    """A training conversation (ending with an assistant turn) to `input_ids` and a `completion_mask`.

    The mask is 1 on each assistant turn's tokens and its closing "</s>", 0 on "<s>" and the "[INST] ... [/INST]"
    parts; with `train_on_prompt` it is 1 everywhere but "<s>", which no token predicts.
    """
    (example,) = tokenize_conversations([messages], tokenizer, train_on_prompt=train_on_prompt)
    if isinstance(example, ConversationError):
        raise example
    return example


def tokenize_conversations(
    conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, *, train_on_prompt: bool = False,
    prompt_lengths: list[int] | None = None,
) -> list[dict[str, list[int]] | ConversationError]:
    """`tokenize_conversation` for many conversations with one tokenizer call for all their turns (much faster);
    a conversation that cannot be encoded gives its ConversationError in its place.

    `prompt_lengths` gives each conversation's number of first messages that are its prompt: assistant turns among
    them are context and stay 0 in the mask (unless `train_on_prompt`).
    """
    checked: list[list[tuple[str, str]] | ConversationError] = []
    for messages in conversations:
        try:
            checked.append(_turn_texts(*_check_conversation(messages, last_role="assistant")))
        except ConversationError as e:
            checked.append(e)
    encoded = iter(_encode_texts(tokenizer, [text for turns in checked if isinstance(turns, list)
                                             for _, text in turns]))
    examples: list[dict[str, list[int]] | ConversationError] = []
    for turns, messages, prompt_length in zip(checked, conversations, prompt_lengths or [0] * len(conversations)):
        if isinstance(turns, ConversationError):
            examples.append(turns)
            continue
        # a system message is encoded within the first user turn: count the prompt in turns
        prompt_turns = sum(m["role"] != "system" for m in messages[:prompt_length])
        input_ids, completion_mask = [tokenizer.bos_token_id], [0]
        for number, (role, _) in enumerate(turns):
            ids = next(encoded) + ([tokenizer.eos_token_id] if role == "assistant" else [])
            input_ids += ids
            completion_mask += [int(role == "assistant" and number >= prompt_turns)] * len(ids)
        if train_on_prompt:  # "<s>" stays 0: nothing predicts it, and the trained-token counts must not count it
            completion_mask = [0] + [1] * (len(input_ids) - 1)
        examples.append({"input_ids": input_ids, "completion_mask": completion_mask})
    return examples


def tokenize_prompt(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """A conversation ending with a user turn to the prompt ids, ending in "[/INST]", that generation continues."""
    turns = _turn_texts(*_check_conversation(messages, last_role="user"))
    input_ids = [tokenizer.bos_token_id]
    for (role, _), ids in zip(turns, _encode_texts(tokenizer, [text for _, text in turns])):
        input_ids += ids + ([tokenizer.eos_token_id] if role == "assistant" else [])
    return input_ids


def _turn_texts(system_prompt: str | None, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(role, text) of each turn as mistral-common encodes it, apart: the closing "</s>" is added after encoding."""
    texts = []
    for index, (role, content) in enumerate(turns):
        if role == "assistant":
            texts.append((role, content))
            continue
        if index == 0 and system_prompt is not None:
            content = f"{system_prompt}\n\n{content}"
        texts.append((role, f"[INST] {content} [/INST]"))
    return texts


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    # mistral-common reads "<s>" or "</s>" inside a message as text, never as a control token.
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # What `tokenizer(texts, split_special_tokens=True)` does, without building its per-text Python objects.
    previous, backend.encode_special_tokens = backend.encode_special_tokens, True
    try:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = previous


def _check_conversation(
    messages: list[dict], last_role: Literal["user", "assistant"]
) -> tuple[str | None, list[tuple[str, str]]]:
    """The system prompt (or None) and the (role, content) turns; ConversationError naming the first wrong message."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("wrong_type" if messages else "missing_field",
                                f"a conversation must be a non-empty list of messages, got {messages!r:.80}")
    checked = [_check_message(index, message) for index, message in enumerate(messages)]
    system_prompt = checked[0][1] if checked[0][0] == "system" else None
    offset = int(system_prompt is not None)
    turns = checked[offset:]
    for position, (role, _) in enumerate(turns):
        index, expected = position + offset, ("user", "assistant")[position % 2]
        if role == "system":
            raise ConversationError(
                "wrong_turn_order", f"message {index}: a system message is only allowed as the first message"
            )
        if role != expected:
            raise ConversationError(
                "wrong_turn_order",
                f"message {index}: expected role '{expected}', got '{role}'; turns must alternate user/assistant, "
                "starting with user (after an optional system message)"
            )
    if not turns:
        raise ConversationError("wrong_turn_order", "the conversation has a system message but no user message")
    if turns[-1][0] != last_role:
        raise ConversationError("wrong_turn_order",
                                f"the conversation must end with role '{last_role}', it ends with '{turns[-1][0]}'")
    return system_prompt, turns


def _check_message(index: int, message: object) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise ConversationError(
            "wrong_type", f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}",
            index,
        )
    missing = [key for key in ("role", "content") if message.get(key) is None]  # datasets fill absent keys with None
    if missing:
        raise ConversationError("missing_field", f"message {index}: missing key {' and '.join(map(repr, missing))}",
                                index)
    # Datasets give every message the union of all keys, with None where absent: only set values are unexpected.
    unexpected = sorted(key for key, value in message.items() if key not in ("role", "content") and value is not None)
    if unexpected:
        raise ConversationError(
            "unexpected_field",
            f"message {index}: unexpected keys {unexpected}; a message has only 'role' and 'content'", index,
        )
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ConversationError(
            "unknown_role", f"message {index}: unknown role {role!r}; expected one of {', '.join(ROLES)}", index
        )
    if not isinstance(content, str):
        raise ConversationError(
            "wrong_type", f"message {index} ({role}): content must be a string, got {type(content).__name__}", index
        )
    if not content.strip():
        raise ConversationError("empty_message", f"message {index} ({role}): content is empty or only whitespace",
                                index)
    return role, content
