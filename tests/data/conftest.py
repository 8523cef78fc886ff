"""Shared fixtures for the data tests: the Mixtral tokenizer and mistral-common's reference encodings, a private
cache folder, files and recipes built in place, and small rows that say which source and number they are."""

import json
import os
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.cache import CACHE_ENV
from finetune.recipe.schema import Recipe
from finetune.tokenizer import build_mixtral_tokenizer, mixtral_tokenizer_file


@pytest.fixture(scope="session")
def tokenizer():
    return build_mixtral_tokenizer()


@pytest.fixture(scope="session")
def mistral():
    """mistral-common's v1 reference: finetuning validation for conversations ending with the assistant."""
    training = MistralTokenizer.from_file(mixtral_tokenizer_file(), mode=ValidationMode.finetuning)
    serving = MistralTokenizer.v1()
    role_class = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def encode(messages: list[dict]) -> list[int]:
        request = ChatCompletionRequest(messages=[role_class[m["role"]](content=m["content"]) for m in messages])
        return (training if messages[-1]["role"] == "assistant" else serving).encode_chat_completion(request).tokens

    return encode


@pytest.fixture(scope="session")
def mistral_text():
    """mistral-common's v1 plain-text tokenizer."""
    return MistralTokenizer.v1().instruct_tokenizer.tokenizer


@pytest.fixture(scope="session")
def mask_runs():
    """`mask_runs(example)`: the runs of tokens its completion_mask trains, each as its list of ids."""
    def runs_of(example: dict) -> list[list[int]]:
        runs, previous = [], 0
        for token, bit in zip(example["input_ids"], example["completion_mask"]):
            if bit and not previous:
                runs.append([])
            if bit:
                runs[-1].append(token)
            previous = bit
        return runs

    return runs_of


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own preprocessing cache; nothing is written under the home folder."""
    path = tmp_path / "cache"
    before = os.environ.get(CACHE_ENV)
    monkeypatch.setenv(CACHE_ENV, str(path))
    yield path
    # datasets' map with num_proc > 1 replaces os.environ with a copy, which monkeypatch's undo does not reach.
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows: list) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def make_recipe(tmp_path):
    """A recipe with the given data section; its stages are those the data has, unless given."""

    def make(sft: dict | None = None, dpo: dict | None = None, seed: int = 42, stages: list[dict] | None = None,
             **data) -> Recipe:
        if stages is None:
            stages = ([{"type": "sft"}] if sft else []) + ([{"type": "dpo"}] if dpo else [])
        return Recipe.model_validate({
            "seed": seed, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "tiny-mixtral"},
            "data": {**data, "sft": sft, "dpo": dpo}, "stages": stages,
        })

    return make


@pytest.fixture
def chat():
    """A two-turn conversation that names its number and a tag (to tell sources apart)."""

    def row(i: int, tag: str = "") -> dict:
        return {"messages": [{"role": "user", "content": f"{tag}question {i}?"},
                             {"role": "assistant", "content": f"{tag}answer {i}."}]}

    return row


@pytest.fixture
def preference():
    def row(i: int, tag: str = "") -> dict:
        return {"prompt": f"{tag}question {i}?", "chosen": f"{tag}right answer {i}.", "rejected": f"{tag}wrong {i}."}

    return row
