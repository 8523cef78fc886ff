"""A tiny Mixtral checkpoint (bf16 on disk, 3 shards + index, like real ones), built once per session."""
from pathlib import Path

import pytest
import torch

from finetune.moe.tiny import build_tiny_mixtral


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    torch.set_num_threads(2)
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny_mixtral"), seed=0, max_shard_size="2MB")


@pytest.fixture(scope="session")
def tied_tiny_path(tmp_path_factory) -> Path:
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny_tied"), seed=1, tie_word_embeddings=True)


@pytest.fixture
def tokens() -> torch.Tensor:
    """256 tokens: with 8 experts and top-2 every expert of every layer gets routed tokens."""
    return torch.randint(0, 32000, (2, 128), generator=torch.Generator().manual_seed(0))
