"""Preprocessed stage data on disk, keyed by everything that decides its content, written atomically.

An entry is a folder named by its key, holding `train/` (and `eval/`) as saved datasets and `stats.json`. It is
assembled in a temporary folder beside it and renamed into place, so a reader sees a whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

CACHE_ENV = "FINETUNE_CACHE"


def cache_root() -> Path:
    """$FINETUNE_CACHE, or ~/.cache/finetune."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "finetune")


def entry_path(key: str) -> Path:
    return cache_root() / "data" / key


def data_key(parts: dict) -> str:
    """A hash of the JSON of everything the entry depends on, with the data package's code among it."""
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        code.update(path.name.encode() + path.read_bytes())
    payload = json.dumps({**parts, "code": code.hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def tokenizer_identity(tokenizer) -> str:
    """The tokenizer's vocabulary, merges, normalizer, special tokens and chat template, hashed."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.chat_template)
    h.update(json.dumps(specials, default=str).encode())
    return h.hexdigest()


def load(key: str) -> tuple[Dataset, Dataset | None, dict] | None:
    """The entry's train and eval data and stats, or None when there is no such entry."""
    path = entry_path(key)
    if not (path / "stats.json").is_file():
        return None
    from datasets import load_from_disk

    train = load_from_disk(str(path / "train"))
    held_out = load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    return train, held_out, json.loads((path / "stats.json").read_text(encoding="utf-8"))


def save(key: str, train: Dataset, held_out: Dataset | None, stats: dict) -> Path:
    """Write the entry atomically; when another process wrote the same key first, keep theirs."""
    final = entry_path(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        train.save_to_disk(str(staging / "train"))
        if held_out is not None:
            held_out.save_to_disk(str(staging / "eval"))
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        try:
            staging.rename(final)
        except OSError:  # the key is already there: same inputs, same content
            if not (final / "stats.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
