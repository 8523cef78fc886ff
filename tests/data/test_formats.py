"""Row formats to messages: chat, prompt/completion, instruction and preference rows, renamed columns, detection."""

import json

import pytest

from finetune.data.formats import BadRow, detect_format, preference_messages, sft_messages

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(("row", "row_format", "columns", "expected", "prompt"), [
    ({"messages": [S, U, A, U, A]}, "messages", {}, [S, U, A, U, A], 0),
    ({"conversation": [U, A]}, "messages", {"messages": "conversation"}, [U, A], 0),
    ({"messages": json.dumps([U, A])}, "messages", {}, [U, A], 0),  # a list stored as JSON text (a string column)
    ({"messages": [U, A], "system": "be brief"}, "messages", {}, [S, U, A], 0),
    ({"messages": [U, A], "sys": "be brief"}, "messages", {"system": "sys"}, [S, U, A], 0),
    ({"messages": [S, U, A], "system": ""}, "messages", {}, [S, U, A], 0),
    ({"prompt": "hi", "completion": "hello"}, "prompt_completion", {}, [U, A], 1),
    ({"prompt": [S, U], "completion": [A]}, "prompt_completion", {}, [S, U, A], 2),
    # a multi-turn prompt: its assistant turn is context, the completion is what is trained
    ({"prompt": [U, A, U], "completion": "bye"}, "prompt_completion", {}, [U, A, U, assistant("bye")], 3),
    ({"prompt": [U, A, U], "completion": "bye", "system": "be brief"}, "prompt_completion", {},
     [S, U, A, U, assistant("bye")], 4),
    ({"prompt": "hi", "completion": "hello", "system": "be brief"}, "prompt_completion", {}, [S, U, A], 2),
    ({"q": "hi", "a": "hello"}, "prompt_completion", {"prompt": "q", "completion": "a"}, [U, A], 1),
    ({"prompt": "[1, 2] sorted?", "completion": "yes"}, "prompt_completion", {},
     [user("[1, 2] sorted?"), assistant("yes")], 1),  # JSON-looking text that is not messages stays text
    ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "instruction", {},
     [user("Add.\n\n2 and 3"), assistant("5")], 1),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "instruction", {}, [user("Say hi."), assistant("hi")],
     1),
    ({"instruction": "Say hi.", "output": "hi"}, "instruction", {}, [user("Say hi."), assistant("hi")], 1),
    ({"instruction": "Say hi.", "output": "hi", "system": "be brief"}, "instruction", {},
     [S, user("Say hi."), assistant("hi")], 2),
    ({"task": "Say hi.", "answer": "hi"}, "instruction", {"instruction": "task", "output": "answer"},
     [user("Say hi."), assistant("hi")], 1),
])
def test_sft_rows_to_messages_and_their_prompt_length(row, row_format, columns, expected, prompt):
    assert sft_messages(row, row_format, columns) == (expected, prompt)


@pytest.mark.parametrize(("row", "columns", "expected"), [
    ({"prompt": "hi", "chosen": "hello", "rejected": "go away"}, {}, ([U], [A], [assistant("go away")])),
    ({"prompt": [S, U], "chosen": [A], "rejected": [assistant("no")]}, {}, ([S, U], [A], [assistant("no")])),
    # ultrafeedback_binarized: chosen and rejected repeat the prompt
    ({"prompt": "hi", "chosen": [U, A], "rejected": [U, assistant("no")]}, {}, ([U], [A], [assistant("no")])),
    ({"prompt": "hi", "chosen": "hello", "rejected": "no", "system": "be brief"}, {},
     ([S, U], [A], [assistant("no")])),
    ({"prompt": "hi", "chosen": [U, A], "rejected": [U, assistant("no")], "sys": "be brief"}, {"system": "sys"},
     ([S, U], [A], [assistant("no")])),
    ({"question": "hi", "good": "hello", "bad": "no"}, {"prompt": "question", "chosen": "good", "rejected": "bad"},
     ([U], [A], [assistant("no")])),
])
def test_preference_rows_to_trl_conversational_form(row, columns, expected):
    assert preference_messages(row, columns) == expected


@pytest.mark.parametrize(("row", "row_format", "columns", "reason", "message"), [
    ({"text": "hi"}, "messages", {}, "missing_field", "missing field 'messages'"),
    ({"messages": None}, "messages", {}, "missing_field", "missing field 'messages'"),
    ({"conv": None}, "messages", {"messages": "conv"}, "missing_field", "'conv' (the messages field)"),
    ({"messages": "hello"}, "messages", {}, "wrong_type", "must be a list of messages"),
    ({"messages": {"role": "user"}}, "messages", {}, "wrong_type", "got dict"),
    ({"prompt": "hi"}, "prompt_completion", {}, "missing_field", "'completion'"),
    ({"prompt": 3, "completion": "x"}, "prompt_completion", {}, "wrong_type", "'prompt' must be a list"),
    ({"instruction": "x"}, "instruction", {}, "missing_field", "'output'"),
    ({"instruction": ["x"], "output": "y"}, "instruction", {}, "wrong_type", "'instruction' must be a string"),
    ({"instruction": "x", "input": 2, "output": "y"}, "instruction", {}, "wrong_type", "'input' must be a string"),
    ({"prompt": [S, U], "completion": "x", "system": "y"}, "prompt_completion", {}, "wrong_turn_order",
     "both a system column and a system message"),
    ({"messages": [S, U, A], "system": "y"}, "messages", {}, "wrong_turn_order",
     "both a system column and a system message"),
    ({"messages": [U, A], "system": ["y"]}, "messages", {}, "wrong_type", "'system' must be a string"),
    ({"prompt": [U, A], "completion": []}, "prompt_completion", {}, "missing_field", "'completion' holds no message"),
])
def test_bad_sft_rows_name_reason_and_field(row, row_format, columns, reason, message):
    with pytest.raises(BadRow, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        sft_messages(row, row_format, columns)
    assert info.value.reason == reason


@pytest.mark.parametrize(("row", "reason", "message"), [
    ({"prompt": "hi", "chosen": "a"}, "missing_field", "'rejected'"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "identical_pair", "the same reply"),
    ({"prompt": "hi", "chosen": [A, A], "rejected": "b"}, "wrong_turn_order", "one assistant reply"),
    ({"prompt": "hi", "chosen": [user("other")], "rejected": "b"}, "wrong_turn_order", "got role 'user'"),
    ({"prompt": "hi", "chosen": [{"role": "bot", "content": "x"}], "rejected": "b"}, "unknown_role", "'bot'"),
    ({"prompt": "hi", "chosen": ["x"], "rejected": "b"}, "wrong_type", "must hold a message"),
    ({"prompt": "hi", "chosen": [U, A], "rejected": [U]}, "missing_field", "the prompt but no reply"),
    ({"prompt": [S, U], "chosen": "a", "rejected": "b", "system": "y"}, "wrong_turn_order",
     "both a system column and a system message"),
])
def test_bad_preference_rows(row, reason, message):
    with pytest.raises(BadRow, match=message) as info:
        preference_messages(row, {})
    assert info.value.reason == reason


@pytest.mark.parametrize(("keys", "columns", "expected"), [
    (["messages"], {}, "messages"),
    (["messages", "id", "prompt"], {}, "messages"),
    (["prompt", "chosen", "rejected"], {}, "preference"),
    (["prompt", "chosen", "rejected", "messages"], {}, "messages"),
    (["instruction", "input", "output"], {}, "instruction"),
    (["instruction", "output"], {}, "instruction"),
    (["prompt", "completion"], {}, "prompt_completion"),
    (["conversations"], {"messages": "conversations"}, "messages"),
    (["q", "a"], {"prompt": "q", "completion": "a"}, "prompt_completion"),
    (["conversations"], {}, None),
    (["prompt"], {}, None),
    ([], {}, None),
])
def test_format_detection(keys, columns, expected):
    assert detect_format(keys, columns) == expected
