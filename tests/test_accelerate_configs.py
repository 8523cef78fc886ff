"""Every shipped accelerate config parses with accelerate's own loader."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "accelerate_configs").rglob("*.yaml"))


def test_found_configs():
    assert {p.name for p in CONFIGS} >= {"cpu.yaml", "single_gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
