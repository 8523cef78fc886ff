"""Local JSON Lines, JSON, Parquet and CSV files give the same examples; splits slice them; rows keep their numbers."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.chat import tokenize_conversation
from finetune.data.prepare import prepare_dpo, prepare_sft
from finetune.data.sources import DataError
from finetune.tokenizer import mixtral_tokenizer_file

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome."}],
    [{"role": "user", "content": "Say \"hi\", then a newline,\nthen bye."},
     {"role": "assistant", "content": "hi\nbye"}],
    [{"role": "user", "content": "日本語で?"}, {"role": "assistant", "content": "はい、日本語です。"}],
]


def write_rows(path, rows: list[dict]) -> str:
    """The same rows as the file type that `path` names; CSV cells hold lists as JSON text."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return str(path)


def reference_ids(messages: list[dict]) -> list[int]:
    """mistral-common's own encoding of the conversation."""
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[classes[m["role"]](content=m["content"]) for m in messages])
    reference = MistralTokenizer.from_file(mixtral_tokenizer_file(), mode=ValidationMode.finetuning)
    return reference.encode_chat_completion(request).tokens


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_type_gives_the_mistral_common_tokens(tmp_path, make_recipe, tokenizer, suffix):
    path = write_rows(tmp_path / f"chat{suffix}", [{"messages": m} for m in CONVERSATIONS])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer)
    got = sorted(prepared.train["input_ids"])
    assert got == sorted(reference_ids(m) for m in CONVERSATIONS)
    for row in prepared.train:
        expected = next(tokenize_conversation(m, tokenizer) for m in CONVERSATIONS
                        if reference_ids(m) == row["input_ids"])
        assert row["completion_mask"] == expected["completion_mask"]
    assert prepared.stats["sources"][0]["format"] == "messages" and prepared.stats["sources"][0]["detected"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_instruction_and_prompt_completion_rows_in_every_file_type(tmp_path, make_recipe, tokenizer, suffix):
    instruction = write_rows(tmp_path / f"instruction{suffix}", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    ])
    completion = write_rows(tmp_path / f"completion{suffix}", [
        {"prompt": "Say hello.", "completion": "Hello!", "system": "Be kind."},
    ])
    recipe = make_recipe(sft={"sources": [{"path": instruction}, {"path": completion}]})
    prepared = prepare_sft(recipe, tokenizer)
    assert sorted(prepared.train["input_ids"]) == sorted([
        reference_ids([{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                       {"role": "assistant", "content": "5"}]),
        reference_ids([{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]),
        reference_ids([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hello."},
                       {"role": "assistant", "content": "Hello!"}]),
    ])
    assert [s["format"] for s in prepared.stats["sources"]] == ["instruction", "prompt_completion"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_preference_rows_in_every_file_type(tmp_path, make_recipe, tokenizer, suffix):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": f"a{i}"}],
             "rejected": [{"role": "assistant", "content": f"b{i}"}]} for i in range(3)]
    path = write_rows(tmp_path / f"pref{suffix}", rows)
    prepared = prepare_dpo(make_recipe(dpo={"sources": [{"path": path}]}), tokenizer)
    assert sorted(prepared.train.to_list(), key=lambda r: r["prompt"][0]["content"]) == rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_a_text_that_looks_like_messages_is_text_outside_csv(tmp_path, make_recipe, tokenizer, suffix):
    """Only a CSV cell holds a list of messages as JSON text; elsewhere such a string is what someone wrote (a reply
    quoting an API payload, say) and is trained as it stands."""
    payload = json.dumps([{"role": "assistant", "content": "x"}])
    path = write_rows(tmp_path / f"rows{suffix}", [{"prompt": "Show the payload.", "completion": payload}])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer)
    content = "x" if suffix == ".csv" else payload
    assert prepared.train["input_ids"] == [reference_ids([{"role": "user", "content": "Show the payload."},
                                                          {"role": "assistant", "content": content}])]


def test_only_the_message_columns_of_a_csv_are_decoded(tmp_path, make_recipe, tokenizer):
    """An output, a system prompt or a column nobody reads stays text in a CSV, even when it looks like messages;
    a message column that cannot be decoded is a bad row naming the column."""
    payload = json.dumps([{"role": "assistant", "content": "x"}])
    path = write_rows(tmp_path / "rows.csv", [{"instruction": "Show the payload.", "output": payload,
                                               "system": payload, "notes": "[" * 5000}])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer)
    assert prepared.train["input_ids"] == [reference_ids([{"role": "system", "content": payload},
                                                          {"role": "user", "content": "Show the payload."},
                                                          {"role": "assistant", "content": payload}])]
    deep = write_rows(tmp_path / "deep.csv", [{"prompt": "[" * 5000, "completion": "fine"}])
    with pytest.raises(DataError, match=r"deep.csv:2: too_nested: 'prompt': a list of messages written as JSON"):
        prepare_sft(make_recipe(sft={"sources": [{"path": deep}]}), tokenizer)


@pytest.mark.parametrize(("split", "expected"), [
    ("train", list(range(10))), ("train[:3]", [0, 1, 2]), ("train[7:]", [7, 8, 9]), ("train[:20%]", [0, 1]),
    ("train[50%:70%]", [5, 6]), ("train[-2:]", [8, 9]),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_split_slices_a_local_file(tmp_path, make_recipe, tokenizer, chat, split, expected, suffix):
    path = write_rows(tmp_path / f"chat{suffix}", [chat(i) for i in range(10)])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": path, "split": split}]}), tokenizer)
    texts = [tokenizer.decode(ids) for ids in prepared.train["input_ids"]]
    assert sorted(int(t.split("answer ")[1].split(".")[0]) for t in texts) == expected


def test_row_numbers_are_file_lines_for_jsonl_and_csv_and_positions_otherwise(tmp_path, make_recipe, tokenizer):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}
    good = {"messages": CONVERSATIONS[0]}
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join([json.dumps(good), "", json.dumps(bad)]) + "\n")  # the blank line is not a row
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('messages\n"' + json.dumps(good["messages"]).replace('"', '""').replace("4", "4\nfour")
                        + '"\n"' + json.dumps(bad["messages"]).replace('"', '""') + '"\n')
    for path, where in ((jsonl, f"{jsonl}:3:"), (csv_path, f"{csv_path}:4:"),
                        (write_rows(tmp_path / "a.json", [good, bad]), "a.json row 2:"),
                        (write_rows(tmp_path / "a.parquet", [good, bad]), "a.parquet row 2:")):
        with pytest.raises(DataError, match="unknown_role") as info:
            prepare_sft(make_recipe(sft={"sources": [{"path": str(path)}]}), tokenizer)
        assert where in str(info.value), str(info.value)


def test_json_file_must_hold_a_list(tmp_path, make_recipe, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('{"messages": []}')
    with pytest.raises(DataError, match="must hold a list of rows"):
        prepare_sft(make_recipe(sft={"sources": [{"path": str(path)}]}), tokenizer)
    path.write_text('[{"messages": []}')
    with pytest.raises(DataError, match=r"rows.json:1: not valid JSON"):
        prepare_sft(make_recipe(sft={"sources": [{"path": str(path)}]}), tokenizer)


def test_undetectable_or_mismatched_format_is_named(tmp_path, make_recipe, tokenizer, write_jsonl, chat, preference):
    odd = write_jsonl("odd.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(DataError, match=r"odd.jsonl: cannot tell the row format from its fields \['conversations'\]"):
        prepare_sft(make_recipe(sft={"sources": [{"path": odd}]}), tokenizer)
    chats = write_jsonl("chats.jsonl", [chat(0)])
    with pytest.raises(DataError, match="a dpo stage reads preference rows"):
        prepare_dpo(make_recipe(dpo={"sources": [{"path": chats}]}), tokenizer)
    prefs = write_jsonl("prefs.jsonl", [preference(0)])
    with pytest.raises(DataError, match="an? sft stage reads chat or instruction rows"):
        prepare_sft(make_recipe(sft={"sources": [{"path": prefs}]}), tokenizer)


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_a_parquet_file_that_cannot_be_read_is_one_error_naming_file_and_key(tmp_path, make_recipe, tokenizer, chat,
                                                                             damage):
    good = write_rows(tmp_path / "good.jsonl", [chat(0)])
    path = tmp_path / "rows.parquet"
    if damage == "truncated":
        write_rows(path, [chat(i) for i in range(10)])
        path.write_bytes(path.read_bytes()[:-20])  # as a copy cut short leaves it
    else:
        path.write_text("messages\nhello\n")
    with pytest.raises(DataError) as info:
        prepare_sft(make_recipe(sft={"sources": [{"path": good}, {"path": str(path)}]}), tokenizer)
    message = str(info.value)
    assert message.startswith(f"data.sft.sources.1.path: {path} cannot be read as Parquet") and "\n" not in message
    assert "<Buffer>" not in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf8_byte_order_mark_is_accepted_in_every_text_format(tmp_path, make_recipe, tokenizer, suffix):
    plain = write_rows(tmp_path / f"plain{suffix}", [{"messages": m} for m in CONVERSATIONS])
    marked = tmp_path / f"marked{suffix}"
    marked.write_bytes(b"\xef\xbb\xbf" + (tmp_path / f"plain{suffix}").read_bytes())  # as Excel writes UTF-8 CSV
    expected = prepare_sft(make_recipe(sft={"sources": [{"path": plain}]}), tokenizer)
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": str(marked)}]}), tokenizer)
    assert sorted(prepared.train["input_ids"]) == sorted(expected.train["input_ids"])
    assert prepared.stats["sources"][0]["dropped"] == {} and prepared.stats["sources"][0]["format"] == "messages"


@pytest.mark.parametrize("split", ["train[5:2]", "train[150%:]", "train[20:]"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_split_that_selects_no_rows_says_so(tmp_path, make_recipe, tokenizer, chat, split, suffix):
    path = write_rows(tmp_path / f"chat{suffix}", [chat(i) for i in range(20)])
    other = write_rows(tmp_path / "other.jsonl", [chat(0)])
    sources = [{"path": path, "split": split}, {"path": other}]
    with pytest.raises(DataError) as info:
        prepare_sft(make_recipe(sft={"sources": sources}), tokenizer)
    message = str(info.value)
    assert message.startswith("data.sft: 1 source(s) give no rows:\n")
    assert f"  - {path}: split '{split}' selects 0 of its 20 rows\n" in message
    assert "empty file" not in message and "row(s) cannot be used" not in message

    prepared = prepare_sft(make_recipe(sft={"sources": sources}, on_bad_row="drop"), tokenizer)
    assert f"{path} gives no rows: split '{split}' selects 0 of its 20 rows" in prepared.summary()
