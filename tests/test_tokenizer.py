"""The rebuilt Mixtral tokenizer against mistral-common's v1 tokenizer (the SentencePiece reference)."""

import random

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from transformers import AutoTokenizer

from finetune.tokenizer import build_mixtral_tokenizer, mixtral_tokenizer_file

TEXTS = [
    "",
    " ",
    "  ",
    " " * 15,
    " " * 16,
    " " * 17,
    " " * 100 + "x",
    "Hello",
    "Hello world",
    " Hello",
    "  Hello",
    "Hello ",
    "Hello   ",
    "a  b   c    d     e",
    "\n",
    "\n\n",
    "\nstarts with a newline",
    "ends with a newline\n",
    "line one\nline two\r\nline three\rfour",
    "\t",
    "tabs\tin\t\tthe middle\t",
    " \t \n mixed \n\t whitespace \t\n ",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 😀👍🏽🇫🇷 and a ZWJ family 👨‍👩‍👧",
    "accents: café, naïve, Ærøskøbing, ß, İstanbul",
    "combining: e\u0301 versus \u00e9",
    "digits 1234567890 3.14159 -42 1e-5 0x1F",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n        pass\n",
    "[INST] not a real instruction [/INST]",
    "<s> </s> <unk> <pad>",
    "a<s>b</s>c",
    "\u2581 the SentencePiece space symbol \u2581\u2581",
    "\x00\x01\x7f control characters",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic space",
    "\ufffd replacement and \U0010ffff last code point",
    "mañana ¿qué? ¡sí! — «quotes» “curly” ‘single’",
    "العربية والفارسی",
    "Ελληνικά Кириллица עברית हिन्दी ไทย",
    "x" * 5000,
    "The quick brown fox jumps over the lazy dog. " * 400,
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_mixtral_tokenizer()


@pytest.fixture(scope="module")
def reference():
    return MistralTokenizer.v1().instruct_tokenizer.tokenizer


def random_texts(reference, count: int, seed: int) -> list[str]:
    """Concatenations of vocabulary pieces, of random code points, and of whitespace runs with words."""
    rng = random.Random(seed)
    pieces = [reference.id_to_piece(i).replace("\u2581", " ") for i in range(259, reference.n_words)]
    fragments = [" " * n for n in range(1, 40)] + ["\n", "\t", "\r\n", "a", "the", ".", "\u3000", "\xa0", "😀", "<s>"]
    texts = []
    for _ in range(count):
        kind = rng.randrange(3)
        if kind == 0:
            texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))))
        elif kind == 1:
            ranges = [(0, 0x7FF), (0x800, 0xD7FF), (0xE000, 0x10FFFF)]  # every code point but the surrogates
            texts.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 30))))
        else:
            texts.append("".join(rng.choice(fragments) for _ in range(rng.randint(1, 15))))
    return texts


def test_file_is_the_one_mistral_common_uses(reference):
    path = mixtral_tokenizer_file()
    assert path.name == "tokenizer.model.v1"
    assert path.resolve() == reference.file_path.resolve()


def test_vocabulary_and_special_tokens(tokenizer, reference):
    assert len(tokenizer) == reference.n_words == 32000
    assert tokenizer.convert_ids_to_tokens(list(range(reference.n_words))) == reference.vocab()
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", reference.bos_id)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", reference.eos_id)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", reference.unk_id)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert tokenizer.model_max_length == 32768


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_and_decode_match_mistral_common(tokenizer, reference, text):
    ids = reference.encode(text, bos=False, eos=False)
    assert tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) == ids
    assert tokenizer(text, split_special_tokens=True)["input_ids"] == reference.encode(text, bos=True, eos=False)
    if not any(special in text for special in ("<s>", "</s>", "<unk>")):
        assert tokenizer.encode(text, add_special_tokens=False) == ids
    decoded = reference.decode(ids)
    assert tokenizer.decode(ids) == decoded
    assert tokenizer.decode([reference.bos_id, *ids, reference.eos_id], skip_special_tokens=True) == decoded


def test_random_texts_match_mistral_common(tokenizer, reference):
    texts = random_texts(reference, 3000, seed=0)
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    mismatches = [t for t, ids in zip(texts, encoded) if ids != reference.encode(t, bos=False, eos=False)]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[0]!r}"
    undecoded = [t for t, ids in zip(texts, encoded) if tokenizer.decode(ids) != reference.decode(ids)]
    assert not undecoded, f"{len(undecoded)} decodes differ, first: {undecoded[0]!r}"


def test_control_token_strings_in_text_are_read_as_control_tokens_by_default(tokenizer):
    # The chat template relies on this; mistral-common reads them as text, which `split_special_tokens=True` gives.
    assert tokenizer.encode("a</s>", add_special_tokens=False)[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in tokenizer.encode("a</s>", add_special_tokens=False, split_special_tokens=True)


def test_save_and_plain_autotokenizer_reload_is_identical(tokenizer, reference, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    assert loaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.model_max_length == tokenizer.model_max_length
    assert loaded.special_tokens_map == tokenizer.special_tokens_map
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id, loaded.pad_token_id) == (1, 2, 0, 0)
    for text in TEXTS[:30]:
        assert loaded(text, split_special_tokens=True)["input_ids"] == reference.encode(text, bos=True, eos=False)

    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": " What is 2+2?\n"},
        {"role": "assistant", "content": "4 "},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    role_class = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[role_class[m["role"]](content=m["content"]) for m in conversation])
    mistral = MistralTokenizer.from_file(mixtral_tokenizer_file(), mode=ValidationMode.finetuning)
    expected = mistral.encode_chat_completion(request).tokens
    assert loaded.apply_chat_template(conversation, tokenize=True, return_dict=False) == expected


def test_a_run_keeps_the_sentencepiece_file_its_tokenizer_came_with(tokenizer, tmp_path):
    """transformers 5 saves tokenizer.json only; the run's copy keeps tokenizer.model for the export to hand on."""
    from finetune.pipeline import save_tokenizer

    given = tmp_path / "given"
    tokenizer.save_pretrained(given)
    (given / "tokenizer.model").write_bytes(mixtral_tokenizer_file().read_bytes())
    save_tokenizer(AutoTokenizer.from_pretrained(given), tmp_path / "run-tokenizer")
    assert (tmp_path / "run-tokenizer" / "tokenizer.model").read_bytes() == mixtral_tokenizer_file().read_bytes()
    # a run whose model.tokenizer is its own tokenizer folder saves it onto itself
    save_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "run-tokenizer"), tmp_path / "run-tokenizer")
    assert (tmp_path / "run-tokenizer" / "tokenizer.model").read_bytes() == mixtral_tokenizer_file().read_bytes()
    save_tokenizer(tokenizer, tmp_path / "rebuilt")  # built from mistral-common's file: no tokenizer.model of its own
    assert not (tmp_path / "rebuilt" / "tokenizer.model").exists()
