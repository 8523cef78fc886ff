"""The `finetune` command as a user meets it: `generate` and `chat` on damaged or wrong folders, `chat` at the end
of its input, and export options that do not go together. Each command runs in this process (a child process
costs seconds of imports) on a tiny Mixtral saved with the Mixtral tokenizer, laid out as an export."""

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from finetune.cli import main
from finetune.moe.tiny import build_tiny_mixtral
from finetune.tokenizer import build_mixtral_tokenizer


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """What generate and chat load from an export: config, weights, tokenizer."""
    path = tmp_path_factory.mktemp("export")
    build_tiny_mixtral(path, dtype=torch.float32)
    build_mixtral_tokenizer().save_pretrained(path)
    return path


def test_chat_ends_at_end_of_input_on_a_line_of_its_own(export_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Count from 2 to 5.\n"))  # then Ctrl-D
    assert main(["chat", str(export_dir), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 1 and out.endswith("you> \n")  # the shell's prompt then starts a line


def spoil_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def cut_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def break_config(folder: Path) -> None:
    (folder / "config.json").write_text("{", encoding="utf-8")


def drop_tokenizer(folder: Path) -> None:  # what a base checkpoint folder looks like
    (folder / "tokenizer_config.json").unlink()


@pytest.mark.parametrize("spoil, why", [
    (spoil_weights, "cannot load the model for generation: Error no file named model.safetensors"),
    (cut_weights, "cannot load the model for generation: Error while deserializing header"),
    (break_config, "cannot load the model for generation: .*config.json' is not a valid JSON file"),
    (drop_tokenizer, r"has config.json but no tokenizer \(tokenizer_config.json\)"),
])
def test_generate_on_a_damaged_export_is_one_line_naming_the_folder(export_dir, tmp_path, capsys, spoil, why):
    folder = Path(shutil.copytree(export_dir, tmp_path / "export"))
    spoil(folder)
    assert main(["generate", str(folder), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert re.match(f"error: {re.escape(str(folder))}: {why}", err), err


def test_generate_on_an_adapter_only_export_says_what_to_give(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}), encoding="utf-8")
    assert main(["generate", str(tmp_path), "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}: neither an export (config.json) nor a finished run "
                                       "folder (run.json); this is an adapter-only export: give the run folder or "
                                       "a merged export\n")


@pytest.mark.parametrize("options, named", [
    (["--base", "dequantized"], "--base"),
    (["--max-shard-size", "1GB"], "--max-shard-size"),
    (["--base", "original", "--max-shard-size", "5GB"], "--base and --max-shard-size"),
])
def test_adapter_only_refuses_the_merge_settings_it_would_ignore(tmp_path, capsys, options, named):
    out = tmp_path / "out"
    assert main(["export", str(tmp_path), "--adapter-only", *options, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {named}: settings of the merged export; --adapter-only writes " \
                                      "the adapter alone\n"
    assert not out.exists()
