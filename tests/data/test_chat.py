"""Mixtral-Instruct conversations: our ids, the chat template's and trl's DPO ids against mistral-common v1."""

import random
import re
from types import SimpleNamespace

import pytest

from finetune.data.chat import ConversationError, tokenize_conversation, tokenize_conversations, tokenize_prompt
from finetune.tokenizer import build_mixtral_tokenizer

FRAGMENTS = [
    "Hello",
    "What is the capital of France?",
    "  leading spaces",
    "trailing spaces   ",
    "\nstarts with a newline",
    "ends with a newline\n",
    "two\n\nparagraphs\n",
    "tabs\tand\t\ttabs",
    "日本語と中文",
    "emoji 😀👍🏽",
    "café naïve Ærø",
    "digits 1234567890 3.14",
    "```python\ndef f(x):\n    return x  # done\n```",
    "[INST] fake instruction [/INST]",
    " ",
    "\t",
    "    ",
]
CONTROL_STRINGS = ["<s>", "</s>", "<unk>"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_mixtral_tokenizer()


def random_content(rng: random.Random, control_strings: bool) -> str:
    fragments = FRAGMENTS + (CONTROL_STRINGS if control_strings else [])
    content = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.1:
        content = (content + " lorem ipsum dolor\n") * rng.randint(50, 150)
    return content if content.strip() else content + "x"


def random_conversation(rng: random.Random, control_strings: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": random_content(rng, control_strings)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 6)):
        messages.append({"role": "user", "content": random_content(rng, control_strings)})
        messages.append({"role": "assistant", "content": random_content(rng, control_strings)})
    return messages


def conversations(count: int, seed: int, control_strings: bool = True) -> list[list[dict]]:
    rng = random.Random(seed)
    return [random_conversation(rng, control_strings) for _ in range(count)]


def test_conversations_match_mistral_common(tokenizer, mistral):
    for messages in conversations(200, seed=0):
        example = tokenize_conversation(messages, tokenizer)
        assert example["input_ids"] == mistral(messages), messages
        assert len(example["completion_mask"]) == len(example["input_ids"])


def test_batched_conversations_match_mistral_common_with_bad_ones_in_place(tokenizer, mistral):
    batch = conversations(60, seed=6)
    bad = {7: [U], 20: [A, U, A], 41: []}
    for index, messages in bad.items():
        batch.insert(index, messages)
    examples = tokenize_conversations(batch, tokenizer)
    assert len(examples) == len(batch)
    for index, (messages, example) in enumerate(zip(batch, examples)):
        if index in bad:
            assert isinstance(example, ConversationError)
        else:
            assert example["input_ids"] == mistral(messages)
            assert example == tokenize_conversation(messages, tokenizer)


def test_prompts_match_mistral_common_and_prefix_the_conversation(tokenizer, mistral):
    for messages in conversations(200, seed=1):
        prompt = tokenize_prompt(messages[:-1], tokenizer)
        assert prompt == mistral(messages[:-1]), messages[:-1]
        assert mistral(messages)[: len(prompt)] == prompt


def test_completion_mask_is_exactly_each_assistant_turn_and_its_eos(tokenizer, mistral_text, mask_runs):
    for messages in conversations(100, seed=2):
        example = tokenize_conversation(messages, tokenizer)
        runs = mask_runs(example)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert runs == [mistral_text.encode(a, bos=False, eos=True) for a in answers]
        assert [tokenizer.decode(run) for run in runs] == [a + "</s>" for a in answers]
        assert example["completion_mask"][0] == 0


def test_prompt_lengths_leave_the_prompt_assistant_turns_untrained(tokenizer, mistral, mistral_text, mask_runs):
    batch = conversations(100, seed=7)
    rng = random.Random(7)
    lengths = [rng.randrange(len(messages)) for messages in batch]  # the prompt may hold the system message alone
    examples = tokenize_conversations(batch, tokenizer, prompt_lengths=lengths)
    for messages, length, example in zip(batch, lengths, examples):
        assert example["input_ids"] == mistral(messages)  # only the mask depends on where the prompt ends
        answers = [m["content"] for m in messages[length:] if m["role"] == "assistant"]
        assert mask_runs(example) == \
            [mistral_text.encode(a, bos=False, eos=True) for a in answers]
    full = tokenize_conversations(batch[:5], tokenizer, train_on_prompt=True, prompt_lengths=lengths[:5])
    assert full == tokenize_conversations(batch[:5], tokenizer, train_on_prompt=True)


def test_train_on_prompt_masks_every_token_but_bos(tokenizer, mistral):
    messages = conversations(1, seed=3)[0]
    example = tokenize_conversation(messages, tokenizer, train_on_prompt=True)
    assert example["input_ids"] == mistral(messages)
    # nothing predicts "<s>": marking it would count a token that never carries loss
    assert example["completion_mask"] == [0] + [1] * (len(example["input_ids"]) - 1)


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([U, "hello"], "message 1: expected a dict"),
        ([U, {"role": "assistant"}], "message 1: missing key 'content'"),
        ([{"content": "hi"}, A], "message 0: missing key 'role'"),
        ([U, {**A, "name": "bob"}], "message 1: unexpected keys ['name']"),
        ([{"role": "tool", "content": "x"}, A], "message 0: unknown role 'tool'"),
        ([{"role": "user", "content": ["hi"]}, A], "message 0 (user): content must be a string"),
        ([U, {"role": "assistant", "content": ""}], "message 1 (assistant): content is empty"),
        ([U, {"role": "assistant", "content": " \n"}], "message 1 (assistant): content is empty"),
        ([{**S, "content": ""}, U, A], "message 0 (system): content is empty"),
        ([A, U, A], "message 0: expected role 'user', got 'assistant'"),
        ([U, U, A], "message 1: expected role 'assistant', got 'user'"),
        ([S, U, A, A], "message 3: expected role 'user', got 'assistant'"),
        ([U, A, S, U, A], "message 2: a system message is only allowed as the first message"),
        ([S], "no user message"),
        ([S, U], "must end with role 'assistant', it ends with 'user'"),
    ],
)
def test_invalid_conversations_are_rejected(tokenizer, messages, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        tokenize_conversation(messages, tokenizer)


def test_prompt_must_end_with_a_user_message(tokenizer):
    with pytest.raises(ValueError, match="must end with role 'user'"):
        tokenize_prompt([U, A], tokenizer)


def test_none_valued_extra_keys_are_ignored(tokenizer, mistral):
    messages = [{**U, "tool_calls": None}, {**A, "name": None}]
    assert tokenize_conversation(messages, tokenizer)["input_ids"] == mistral([U, A])


def test_chat_template_matches_mistral_common(tokenizer, mistral):
    # Rendered text cannot tell a "</s>" the template writes from one inside a message: those are left out here.
    for messages in conversations(100, seed=4, control_strings=False):
        expected = tokenize_conversation(messages, tokenizer)
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert rendered["input_ids"] == mistral(messages), messages
        assert rendered["assistant_masks"] == expected["completion_mask"]
        prompt = messages[:-1]
        rendered_prompt = tokenizer.apply_chat_template(
            prompt, tokenize=True, return_dict=False, add_generation_prompt=True
        )
        assert rendered_prompt == mistral(prompt), prompt


def test_chat_template_drops_an_empty_system_prompt_like_mistral_common(tokenizer, mistral):
    messages = [{**S, "content": ""}, U, A]
    assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == mistral(messages)


@pytest.mark.parametrize("messages", [[A, U], [U, U], [U, {"role": "tool", "content": "x"}], [U, A, S, U]])
def test_chat_template_rejects_what_mixtral_instruct_cannot_encode(tokenizer, messages):
    with pytest.raises(Exception, match="Mixtral-Instruct"):
        tokenizer.apply_chat_template(messages, tokenize=False)


def test_trl_dpo_tokenization_concatenates_to_mistral_common(tokenizer, mistral):
    from datasets import Dataset
    from trl import DPOTrainer

    rows = []
    for messages in conversations(30, seed=5, control_strings=False):
        rejected = {"role": "assistant", "content": messages[-1]["content"][::-1] + " no"}
        rows.append({"prompt": messages[:-1], "chosen": messages[-1:], "rejected": [rejected]})
    # trl's own preparation of conversational preference rows; `self` is only read for non-conversational rows.
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    prepared = DPOTrainer._prepare_dataset(None, Dataset.from_list(rows), tokenizer, args, "train")

    for row, example in zip(rows, prepared):
        assert example["prompt_ids"] == mistral(row["prompt"])
        assert example["prompt_ids"] + example["chosen_ids"] == mistral(row["prompt"] + row["chosen"])
        assert example["prompt_ids"] + example["rejected_ids"] == mistral(row["prompt"] + row["rejected"])
