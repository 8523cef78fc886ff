"""What each row format trains, through prepare_sft / prepare_dpo on real files: a system column reaches the token
ids whatever the format, and a prompt/completion row trains its completion only."""

import pytest

from finetune.data.prepare import prepare_dpo, prepare_sft
from finetune.data.sources import DataError

SYSTEM = "Answer in French, in one sentence."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


@pytest.fixture
def reply(mistral_text):
    """The ids a reply trains: its text and the closing "</s>"."""
    return lambda text: mistral_text.encode(text, bos=False, eos=True)


def examples(prepared) -> list[dict]:
    return prepared.train.to_list() + (prepared.eval.to_list() if prepared.eval is not None else [])


def test_a_system_column_of_a_chat_row_reaches_the_token_ids(write_jsonl, make_recipe, tokenizer, mistral, mask_runs,
                                                              reply):
    chat = [user("What is the capital of France?"), assistant("Paris.")]
    path = write_jsonl("chat.jsonl", [{"messages": chat, "system": SYSTEM}])
    (example,) = examples(prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer))
    assert example["input_ids"] == mistral([system(SYSTEM), *chat])
    assert SYSTEM in tokenizer.decode(example["input_ids"])
    assert mask_runs(example) == [reply("Paris.")]

    # renamed with `columns`, as a hub dataset's "system_prompt" column would be
    renamed = write_jsonl("renamed.jsonl", [{"messages": chat, "system_prompt": SYSTEM}])
    for stated in ({}, {"format": "messages"}):  # detected, or stated in the recipe
        source = {"path": renamed, "columns": {"system": "system_prompt"}, **stated}
        recipe = make_recipe(sft={"sources": [source]})
        assert examples(prepare_sft(recipe, tokenizer))[0]["input_ids"] == example["input_ids"]


def test_a_chat_row_with_both_a_system_column_and_message_is_a_bad_row(write_jsonl, make_recipe, tokenizer, mistral):
    good = {"messages": [user("hi"), assistant("hello")]}
    both = {"messages": [system("be brief"), user("hi"), assistant("hello")], "system": SYSTEM}
    path = write_jsonl("chat.jsonl", [good, both])
    with pytest.raises(DataError, match=r"chat.jsonl:2: wrong_turn_order: the row has both a system column and a "
                                        r"system message"):
        prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer)
    lenient = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, on_bad_row="drop"), tokenizer)
    assert lenient.stats["dropped"] == {"wrong_turn_order": 1} and len(examples(lenient)) == 1
    # the same text in both places (datasets that keep the system prompt beside the conversation) is one message
    same = {"messages": [system(SYSTEM), user("hi"), assistant("hello")], "system": SYSTEM}
    (example,) = examples(prepare_sft(make_recipe(sft={"sources": [{"path": write_jsonl("same.jsonl", [same])}]}),
                                      tokenizer))
    assert example["input_ids"] == mistral(same["messages"])


def test_a_system_column_of_a_preference_row_reaches_the_prompt(write_jsonl, make_recipe, tokenizer):
    rows = [{"prompt": "hi", "chosen": "hello", "rejected": "go away", "system": SYSTEM},
            {"prompt": [system("be brief"), user("hi")], "chosen": "a", "rejected": "b", "system": SYSTEM}]
    path = write_jsonl("prefs.jsonl", rows)
    with pytest.raises(DataError, match=r"prefs.jsonl:2: wrong_turn_order: the row has both a system column"):
        prepare_dpo(make_recipe(dpo={"sources": [{"path": path}]}), tokenizer)
    prepared = prepare_dpo(make_recipe(dpo={"sources": [{"path": path}]}, on_bad_row="drop"), tokenizer)
    assert examples(prepared) == [{"prompt": [system(SYSTEM), user("hi")], "chosen": [assistant("hello")],
                                   "rejected": [assistant("go away")]}]


MULTI_TURN = [user("Name a prime."), assistant("Seven."), user("And an even one?")]


@pytest.mark.parametrize("completion", ["Two.", [assistant("Two.")]])
def test_a_multi_turn_prompt_trains_only_its_completion(write_jsonl, make_recipe, tokenizer, mistral, completion,
                                                        mask_runs, reply):
    conversation = [*MULTI_TURN, assistant("Two.")]
    path = write_jsonl("pc.jsonl", [{"prompt": MULTI_TURN, "completion": completion}])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer)
    (example,) = examples(prepared)
    assert example["input_ids"] == mistral(conversation)  # the ids are the whole conversation's
    assert mask_runs(example) == [reply("Two.")]
    assert tokenizer.decode(mask_runs(example)[0]) == "Two.</s>"
    trained = len(reply("Two."))
    assert prepared.stats["train"]["trained_tokens"] == trained
    assert f"({trained:,} trained)" in prepared.summary()

    # the same conversation as a chat row trains every assistant turn
    chat = write_jsonl("chat.jsonl", [{"messages": conversation}])
    (as_chat,) = examples(prepare_sft(make_recipe(sft={"sources": [{"path": chat}]}), tokenizer))
    assert as_chat["input_ids"] == example["input_ids"]
    assert mask_runs(as_chat) == [reply("Seven."), reply("Two.")]


def test_a_completion_of_several_turns_trains_its_assistant_turns(write_jsonl, make_recipe, tokenizer, mistral,
                                                                  mask_runs, reply):
    row = {"prompt": [system(SYSTEM), *MULTI_TURN],
           "completion": [assistant("Two."), user("And an odd one?"), assistant("Nine.")]}
    path = write_jsonl("pc.jsonl", [row])
    (example,) = examples(prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer))
    assert example["input_ids"] == mistral(row["prompt"] + row["completion"])
    assert mask_runs(example) == [reply("Two."), reply("Nine.")]


def test_train_on_prompt_still_trains_a_multi_turn_prompt(write_jsonl, make_recipe, tokenizer):
    path = write_jsonl("pc.jsonl", [{"prompt": MULTI_TURN, "completion": "Two."}])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, train_on_prompt=True), tokenizer)
    (example,) = examples(prepared)
    assert example["completion_mask"] == [0] + [1] * (len(example["input_ids"]) - 1)
    assert prepared.stats["train"]["trained_tokens"] == len(example["input_ids"]) - 1


def test_a_prompt_cut_before_its_completion_has_nothing_to_train(write_jsonl, make_recipe, tokenizer):
    """Truncation that keeps the prompt's assistant turn but none of the completion leaves no token to train."""
    long_prompt = [user("Name a prime."), assistant("Seven."), user("word " * 100)]
    path = write_jsonl("pc.jsonl", [{"prompt": long_prompt, "completion": "Two."}])
    recipe = make_recipe(sft={"sources": [{"path": path}]}, max_seq_len=64, on_too_long="truncate")
    with pytest.raises(DataError, match=r"pc.jsonl:1: no_trainable_tokens: the first 64 of its \d+ tokens"):
        prepare_sft(recipe, tokenizer)


def test_an_empty_completion_is_a_bad_row_not_a_trained_prompt(write_jsonl, make_recipe, tokenizer):
    path = write_jsonl("pc.jsonl", [{"prompt": [user("hi"), assistant("hello")], "completion": []}])
    with pytest.raises(DataError, match=r"pc.jsonl:1: missing_field: 'completion' holds no message"):
        prepare_sft(make_recipe(sft={"sources": [{"path": path}]}), tokenizer)
