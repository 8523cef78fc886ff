"""Rows that cannot be used: strict mode names file, row and reason; lenient mode drops and counts them by reason.

Every kind of bad row is in one file, on a known line; kept + dropped always equals the rows read.
"""

import json
import re

import pytest

from finetune.data.prepare import prepare_dpo, prepare_sft
from finetune.data.sources import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
LONG = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}

# line -> (raw line, reason); line 12 is blank and is not a row.
SFT_LINES = {
    1: (json.dumps(GOOD), None),
    2: (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
    3: ('{"messages": [', "invalid_json"),
    4: ("[1, 2]", "not_an_object"),
    5: ('{"text": "hi"}', "missing_field"),
    6: (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}),
        "unknown_role"),
    7: (json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}),
        "wrong_turn_order"),
    8: (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),
        "empty_message"),
    9: (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]}),
        "wrong_type"),
    10: (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "x", "name": "bob"}]}), "unexpected_field"),
    11: (json.dumps(LONG), "too_long"),
    12: ("", None),
    13: (json.dumps(GOOD), None),
}
SFT_BAD = {line: reason for line, (_, reason) in SFT_LINES.items() if reason}
SFT_ROWS = sum(1 for raw, _ in SFT_LINES.values() if raw)


@pytest.fixture
def bad_sft_file(tmp_path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(raw if isinstance(raw, bytes) else raw.encode() for raw, _ in SFT_LINES.values())
                     + b"\n")
    return str(path)


def test_strict_mode_names_every_bad_row_with_file_line_and_reason(bad_sft_file, make_recipe, tokenizer):
    recipe = make_recipe(sft={"sources": [{"path": bad_sft_file}]}, max_seq_len=64, on_too_long="fail")
    with pytest.raises(DataError) as info:
        prepare_sft(recipe, tokenizer)
    message = str(info.value)
    assert message.startswith(f"data.sft: {len(SFT_BAD)} row(s) cannot be used")
    for line, reason in SFT_BAD.items():
        assert re.search(rf"^  - {re.escape(bad_sft_file)}:{line}: {reason}: .+", message, re.M), (line, message)
    assert "data.on_bad_row: drop" in message


def test_strict_mode_is_the_default_and_too_long_rows_follow_their_own_policy(bad_sft_file, make_recipe, tokenizer):
    recipe = make_recipe(sft={"sources": [{"path": bad_sft_file}]}, max_seq_len=64)
    assert recipe.data.on_bad_row == "fail" and recipe.data.on_too_long == "drop"
    with pytest.raises(DataError) as info:
        prepare_sft(recipe, tokenizer)
    assert f"{bad_sft_file}:11:" not in str(info.value)  # dropped, by on_too_long: drop
    assert f"{bad_sft_file}:10: unexpected_field" in str(info.value)


def test_lenient_mode_counts_every_reason_and_keeps_the_rest(bad_sft_file, make_recipe, tokenizer):
    recipe = make_recipe(sft={"sources": [{"path": bad_sft_file}]}, max_seq_len=64, on_bad_row="drop")
    prepared = prepare_sft(recipe, tokenizer)
    source = prepared.stats["sources"][0]
    assert source["dropped"] == {reason: 1 for reason in SFT_BAD.values()}
    assert source["kept"] == 2 and len(prepared.train) == 2
    assert source["kept"] + sum(source["dropped"].values()) == source["rows"] == SFT_ROWS
    assert source["first_dropped"].startswith(f"{bad_sft_file}:2: invalid_utf8: not valid UTF-8")
    assert prepared.stats["dropped"] == source["dropped"]
    summary = prepared.summary()
    for reason in SFT_BAD.values():
        assert f"1 {reason} (" in summary


def test_too_long_rows_fail_drop_or_truncate(tmp_path, write_jsonl, make_recipe, tokenizer):
    path = write_jsonl("rows.jsonl", [GOOD, LONG, GOOD])
    long_ids = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer).train["input_ids"]
    n_long = max(len(ids) for ids in long_ids)

    with pytest.raises(DataError, match=rf"rows.jsonl:2: too_long: {n_long} tokens, max_seq_len is 64"):
        prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, max_seq_len=64, on_too_long="fail"), tokenizer)

    dropped = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, max_seq_len=64), tokenizer)
    assert dropped.stats["dropped"] == {"too_long": 1} and len(dropped.train) == 2

    # LONG's user turn alone is longer than 64 tokens: cut there, it has nothing left to train on.
    lenient = dict(max_seq_len=64, on_too_long="truncate", on_bad_row="drop")
    truncated = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, **lenient), tokenizer)
    assert truncated.stats["dropped"] == {"no_trainable_tokens": 1}
    with pytest.raises(DataError, match="rows.jsonl:2: no_trainable_tokens: the first 64 of its"):
        prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, max_seq_len=64, on_too_long="truncate"),
                    tokenizer)

    # With room for the answer's start, truncation keeps the first max_seq_len tokens and their mask.
    full = next(r for r in prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer).train
                if len(r["input_ids"]) == n_long)
    cut = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, max_seq_len=n_long - 1,
                                  on_too_long="truncate"), tokenizer)
    assert cut.stats["truncated"] == 1 and cut.stats["dropped"] == {}
    row = next(r for r in cut.train if len(r["input_ids"]) == n_long - 1)
    assert row["input_ids"] == full["input_ids"][:-1] and row["completion_mask"] == full["completion_mask"][:-1]


def test_bad_preference_rows_in_both_modes(tmp_path, make_recipe, tokenizer):
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    lines = {
        1: (good, None),
        2: ({"prompt": "hi", "chosen": "hello"}, "missing_field"),
        3: ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "identical_pair"),
        4: ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
             "chosen": "a", "rejected": "b"}, "wrong_turn_order"),
        5: ({"prompt": "hi", "chosen": "a", "rejected": ""}, "empty_message"),
        6: ({"prompt": [{"role": "narrator", "content": "hi"}], "chosen": "a", "rejected": "b"}, "unknown_role"),
        7: ({"prompt": "word " * 100, "chosen": "a", "rejected": "b"}, "too_long"),
        8: ({"prompt": "hi", "chosen": [{"role": "assistant", "content": "a", "name": "bob"}], "rejected": "b"},
            "unexpected_field"),
        9: (good, None),
        10: ({"prompt": "Strike a word in HTML.", "chosen": "Use <s>word</s>.", "rejected": "No."}, "control_token"),
    }
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _ in lines.values()))
    bad = {line: reason for line, (_, reason) in lines.items() if reason}

    with pytest.raises(DataError) as info:
        prepare_dpo(make_recipe(dpo={"sources": [{"path": str(path)}]}, max_seq_len=64, on_too_long="fail"),
                    tokenizer)
    for line, reason in bad.items():
        assert f"{path}:{line}: {reason}: " in str(info.value)
    assert f"{path}:8: unexpected_field: 'chosen': message 1: unexpected keys ['name']" in str(info.value)
    assert (f"{path}:10: control_token: 'chosen': message 1 (assistant) holds the text <s>, </s>, which trl would encode as "
            "the control token") in str(info.value)

    prepared = prepare_dpo(make_recipe(dpo={"sources": [{"path": str(path)}]}, max_seq_len=64, on_bad_row="drop"),
                           tokenizer)
    source = prepared.stats["sources"][0]
    assert source["dropped"] == {reason: 1 for reason in bad.values()}
    assert source["kept"] + sum(source["dropped"].values()) == source["rows"] == len(lines)
    assert prepared.train.to_list() == [{"prompt": [{"role": "user", "content": "hi"}],
                                         "chosen": [{"role": "assistant", "content": "hello"}],
                                         "rejected": [{"role": "assistant", "content": "go away"}]}] * 2

    # truncate: trl cuts prompt + reply to max_seq_len; a prompt that alone fills it is dropped here, counted
    truncated = prepare_dpo(make_recipe(dpo={"sources": [{"path": str(path)}]}, max_seq_len=64,
                                        on_too_long="truncate", on_bad_row="drop"), tokenizer)
    assert truncated.stats["sources"][0]["dropped"]["no_trainable_tokens"] == 1


def test_bad_rows_in_csv_and_parquet(tmp_path, make_recipe, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "rows.csv"
    csv_path.write_bytes(b"instruction,output\nSay hi.,hi\ncaf\xe9?,yes\nSay bye.,bye,extra\nSay nothing.,\n")
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": str(csv_path)}]}, on_bad_row="drop"), tokenizer)
    assert prepared.stats["sources"][0]["dropped"] == {"invalid_utf8": 1, "missing_field": 1, "wrong_type": 1}
    with pytest.raises(DataError) as info:
        prepare_sft(make_recipe(sft={"sources": [{"path": str(csv_path)}]}), tokenizer)
    for where in (":3: invalid_utf8", ":4: wrong_type: 3 cells for 2 columns", ":5: missing_field: missing field"):
        assert f"{csv_path}{where}" in str(info.value)

    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]),
                   parquet)
    with pytest.raises(DataError, match=r"rows.parquet row 2: missing_field: missing field 'completion'"):
        prepare_sft(make_recipe(sft={"sources": [{"path": str(parquet)}]}), tokenizer)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"[]"])
def test_an_empty_file_fails_in_strict_mode_and_is_reported_in_lenient_mode(tmp_path, write_jsonl, make_recipe,
                                                                             tokenizer, content):
    empty = tmp_path / ("empty.json" if content == b"[]" else "empty.jsonl")
    empty.write_bytes(content)
    other = write_jsonl("other.jsonl", [GOOD])
    with pytest.raises(DataError, match=rf"{re.escape(str(empty))}: empty file: it holds no rows"):
        prepare_sft(make_recipe(sft={"sources": [{"path": str(empty)}, {"path": other}]}), tokenizer)

    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": str(empty)}, {"path": other}]}, on_bad_row="drop"),
                           tokenizer)
    assert prepared.stats["sources"][0] | {"first_dropped": None} == prepared.stats["sources"][0]
    assert prepared.stats["sources"][0]["empty"] and prepared.stats["sources"][0]["rows"] == 0
    assert len(prepared.train) == 1 and "gives no rows: empty file: it holds no rows" in prepared.summary()

    with pytest.raises(DataError, match="no training rows are left"):
        prepare_sft(make_recipe(sft={"sources": [{"path": str(empty)}]}, on_bad_row="drop"), tokenizer)


DEEP = "[" * 5000 + "]" * 5000  # valid JSON, nested deeper than Python's JSON reader goes


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_too_deeply_nested_row_is_one_bad_row(tmp_path, make_recipe, tokenizer, suffix):
    path = tmp_path / f"rows{suffix}"
    tricky = {"messages": [{"role": "user", "content": 'a, ] } " [ {'}, {"role": "assistant", "content": "b"}]}
    if suffix == ".jsonl":
        path.write_text(f"{json.dumps(GOOD)}\n{{\"messages\": {DEEP}}}\n{json.dumps(tricky)}\n")
    else:  # a CSV cell holds the messages as JSON text
        cells = [json.dumps(GOOD["messages"]), DEEP, json.dumps(tricky["messages"])]
        path.write_text('messages\n"' + '"\n"'.join(cell.replace('"', '""') for cell in cells) + '"\n')
    where = {".jsonl": f"{path}:2:", ".csv": f"{path}:3:"}[suffix]  # CSV: after the header
    with pytest.raises(DataError) as info:
        prepare_sft(make_recipe(sft={"sources": [{"path": str(path)}]}), tokenizer)
    assert str(info.value).startswith("data.sft: 1 row(s) cannot be used (1 too_nested):")
    assert f"  - {where} too_nested: " in str(info.value)

    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": str(path)}]}, on_bad_row="drop"), tokenizer)
    source = prepared.stats["sources"][0]
    assert source["dropped"] == {"too_nested": 1} and source["kept"] == 2 and source["rows"] == 3
    first = source["first_dropped"]
    assert first.startswith(f"{where} too_nested: ") and "nested too deeply" in first
    assert "1 too_nested (nested too deeply to read)" in prepared.summary()


def test_a_too_deeply_nested_row_in_a_json_list_fails_the_file_by_name(tmp_path, make_recipe, tokenizer):
    """As a .json file that is not valid JSON: the list is parsed whole (.jsonl reports such a row alone)."""
    path = tmp_path / "rows.json"
    path.write_text(f"[{json.dumps(GOOD)},\n{{\"messages\": {DEEP}}}]")
    for on_bad_row in ("fail", "drop"):
        with pytest.raises(DataError, match=re.escape(f"{path}: a row is nested too deeply to read")):
            prepare_sft(make_recipe(sft={"sources": [{"path": str(path)}]}, on_bad_row=on_bad_row), tokenizer)


def test_a_bad_preference_message_names_its_field(tmp_path, make_recipe, tokenizer):
    rows = {
        1: ({"prompt": "hi", "chosen": "a", "rejected": ""}, "'rejected': message 1 (assistant): content is empty"),
        2: ({"prompt": "hi", "chosen": " ", "rejected": "b"}, "'chosen': message 1 (assistant): content is empty"),
        3: ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt': message 0 (user): content is empty"),
        4: ({"prompt": "hi", "chosen": "a", "rejected": [{"role": "assistant", "content": 7}]},
            "'rejected': message 1 (assistant): content must be a string"),
        5: ({"prompt": "hi", "chosen": [{"role": "assistant"}], "rejected": "b"},
            "'chosen': message 1: missing key 'content'"),
    }
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _ in rows.values()))
    with pytest.raises(DataError) as info:
        prepare_dpo(make_recipe(dpo={"sources": [{"path": str(path)}]}), tokenizer)
    for line, (_, detail) in rows.items():
        assert re.search(rf"^  - {re.escape(str(path))}:{line}: \w+: {re.escape(detail)}", str(info.value), re.M), \
            str(info.value)

    # A renamed column is named as the file has it.
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"question": "hi", "good": "a", "bad": ""}) + "\n")
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataError, match=r"renamed.jsonl:1: empty_message: 'bad': message 1 \(assistant\)"):
        prepare_dpo(make_recipe(dpo={"sources": [{"path": str(renamed), "columns": columns}]}), tokenizer)


def test_preference_messages_compare_by_what_they_say_not_by_the_keys_parquet_fills(tmp_path, make_recipe, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a Parquet column of messages has the union of every row's keys: 'name' is None where a message gave none
    named = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())]))
    plain = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    user = {"role": "user", "content": "hi"}
    table = pa.table({
        "prompt": pa.array([[user], [user], [user]], plain),
        "chosen": pa.array([[{"role": "assistant", "content": "same", "name": None}],
                            # the whole conversation, repeating the prompt
                            [{**user, "name": None}, {"role": "assistant", "content": "good", "name": None}],
                            [{"role": "assistant", "content": "fine", "name": None}]], named),
        "rejected": pa.array([[{"role": "assistant", "content": "same"}], [{"role": "assistant", "content": "bad"}],
                              [{"role": "assistant", "content": "worse"}]], plain),
    })
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    prepared = prepare_dpo(make_recipe(dpo={"sources": [{"path": str(path)}]}, on_bad_row="drop"), tokenizer)
    assert prepared.stats["sources"][0]["dropped"] == {"identical_pair": 1}
    assert sorted(row["chosen"][0]["content"] for row in prepared.train) == ["fine", "good"]
