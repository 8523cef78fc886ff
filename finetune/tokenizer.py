"""Mixtral's SentencePiece tokenizer rebuilt as a `tokenizers`-backed transformers tokenizer.

The reference is mistral-common's v1 tokenizer (`MistralTokenizer.v1()`): plain text and Mixtral-Instruct
conversations must come out with the same ids. transformers cannot convert the `tokenizer.model.v1` file itself
(the file name does not end in `.model`), so the BPE model is built here from the SentencePiece pieces and scores.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPACE = "\u2581"  # SentencePiece's visible space, "▁"
MODEL_MAX_LENGTH = 32768

# Mixtral-Instruct v0.1, as mistral-common's InstructTokenizerV1 encodes it: "<s>", then each user turn as
# "[INST] {content} [/INST]" (a non-empty system prompt and a blank line before the first user text), each assistant
# turn as its text followed by "</s>". mistral-common encodes every turn separately, so every turn's text gets its own
# SentencePiece dummy prefix "▁": after "</s>" the normalizer adds it (a new split after a special token); before an
# assistant text, which follows "[/INST]" in the same split, the template writes it as a space. No piece spans "]" and
# "▁", so encoding that joined text gives the ids of encoding each turn on its own.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_prompt = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_prompt = none -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "<s>"
    "{%- for message in turns -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('Mixtral-Instruct has user and assistant turns after an optional first system message, "
    "got role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Mixtral-Instruct turns must alternate user/assistant, starting with user') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_prompt -%}"
    "{{- '[INST] ' + system_prompt + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{%- generation -%}"
    "{{- ' ' + message['content'] + '</s>' -}}"
    "{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def mixtral_tokenizer_file() -> Path:
    """The SentencePiece model of Mixtral-8x7B (`tokenizer.model.v1`) that mistral-common ships."""
    path = Path(str(importlib.resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")))
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common does not ship {path}; is mistral-common installed from a wheel?")
    return path


def _bpe_vocab_and_merges(model_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and the merges, ranked so that `tokenizers` BPE merges in SentencePiece's order.

    SentencePiece BPE repeatedly joins the adjacent pair whose joined piece scores highest (leftmost first on ties),
    over the whole text at once; control, unknown and byte pieces never take part. `tokenizers` BPE joins the pair of
    lowest rank, so the merges are every split of a mergeable piece into two mergeable pieces, ranked by the piece's
    score. Scores are distinct except for the whitespace runs (1 to 14 and 16 spaces, all -1e9, merged last); for
    those, the longer left part goes first, which ends with the same runs as SentencePiece's leftmost rule.
    """
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    mergeable = {
        sp.id_to_piece(i): sp.get_score(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    ranked: list[tuple[float, int, tuple[str, str]]] = []
    for piece, score in mergeable.items():
        for head, tail in ((piece[:i], piece[i:]) for i in range(1, len(piece))):
            if head in mergeable and tail in mergeable:
                ranked.append((-score, -len(head), (head, tail)))
    ranked.sort()
    return vocab, [pair for _, _, pair in ranked]


def build_mixtral_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer that encodes and decodes like mistral-common's v1 (Mixtral-8x7B) tokenizer.

    `tok(text)` adds "<s>" like `encode(text, bos=True, eos=False)`. Text that contains the literal strings "<s>",
    "</s>" or "<unk>" is read as those control tokens unless `split_special_tokens=True` is passed (mistral-common
    always reads them as text); the chat template needs them read as control tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _bpe_vocab_and_merges(mixtral_tokenizer_file())
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # SentencePiece's dummy prefix and whitespace escaping; on the whole text, as SentencePiece sees it, with no
    # pre-tokenizer splitting it into words.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        # Padding with "</s>" would make padded positions look like ends of sequences to anything that masks by id
        # (collators that label every eos, generation stopping); "<unk>" never occurs in encoded text (byte fallback).
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )
