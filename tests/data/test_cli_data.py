"""`finetune data RECIPE`: stats and examples with the trained tokens marked; bad rows reported without a traceback."""

import json
from pathlib import Path

from finetune.cli import main
from finetune.data.report import CLOSE, OPEN

REPO = Path(__file__).resolve().parents[2]


def test_data_command_previews_both_stages(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(["data", "recipes/quickstart.yaml", "data.sft.packing=true", "--examples", "2", "--color", "never"])
    out = capsys.readouterr().out
    assert code == 0
    assert "data/quickstart/sft.jsonl" in out and "data/quickstart/preference.jsonl" in out
    assert "dropped by reason: none" in out and "length p50" in out
    assert "packing: 456 examples in" in out and "of the token slots hold tokens" in out
    assert "=== packed sequence 1:" in out and out.count("--- example") == 4
    assert f"[/INST]{OPEN} " in out and f"</s>{CLOSE}" in out
    assert "chosen: " + OPEN in out and "rejected: " + OPEN in out


def test_data_command_names_the_bad_row(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "recipe.yaml").write_text("output_dir: run\nmodel: {name_or_path: tiny-mixtral}\n"
                                          "data: {sft: {sources: [{path: rows.jsonl}]}}\nstages: [{type: sft}]\n")
    assert main(["data", "recipe.yaml", "--stage", "sft"]) == 2
    err = capsys.readouterr().err  # after the tokenizing progress bar
    assert "\nerror: data.sft: 1 row(s) cannot be used (1 wrong_turn_order):" in err
    assert "rows.jsonl:1: wrong_turn_order: the conversation must end with role 'assistant'" in err


def test_a_stage_the_recipe_has_no_data_for_is_named_with_the_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(f"output_dir: run\nmodel: {{name_or_path: tiny-mixtral}}\n"
                                          f"data: {{sft: {{sources: [{{path: {REPO}/data/quickstart/sft.jsonl}}]}}}}\n"
                                          "stages: [{type: sft}]\n")
    assert main(["data", "recipe.yaml", "--stage", "dpo"]) == 2
    assert capsys.readouterr().err == "error: --stage dpo: recipe.yaml has no data.dpo section\n"


def test_more_examples_asked_than_there_are_says_how_many_it_shows(tmp_path, capsys, monkeypatch, write_jsonl, chat):
    monkeypatch.chdir(tmp_path)
    write_jsonl("rows.jsonl", [chat(i) for i in range(3)])
    (tmp_path / "recipe.yaml").write_text("output_dir: run\nmodel: {name_or_path: tiny-mixtral}\n"
                                          "data: {sft: {sources: [{path: rows.jsonl}]}}\nstages: [{type: sft}]\n")
    assert main(["data", "recipe.yaml", "--examples", "50", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "[sft] all 3 training examples (trained tokens" in out and out.count("--- example") == 3
