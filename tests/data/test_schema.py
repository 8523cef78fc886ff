"""The data section of a recipe: every key documented, defaults, and the rules between keys, checked at load."""

import textwrap

import pytest

from finetune.recipe import RecipeError, load_recipe
from finetune.recipe.schema import DataSource, DataSpec, DPOData, SFTData, StageData


@pytest.mark.parametrize("section", [DataSpec, StageData, SFTData, DPOData, DataSource])
def test_every_data_key_is_documented(section):
    undocumented = [name for name, field in section.model_fields.items() if not field.description]
    assert not undocumented, f"{section.__name__}: {undocumented}"


def test_defaults_are_strict_and_unpacked():
    spec = DataSpec()
    assert (spec.on_bad_row, spec.on_too_long, spec.max_seq_len, spec.cache) == ("fail", "drop", 2048, True)
    assert SFTData(sources=[{"hub": "x"}]).packing is False


def load(tmp_path, data: str, stages: str = "[{type: sft}]"):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    (tmp_path / "rows.txt").write_text("{}\n")
    (tmp_path / "folder.jsonl").mkdir(exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"output_dir: run\nmodel: {{name_or_path: tiny-mixtral}}\nstages: {stages}\ndata:\n"
                    + textwrap.indent(textwrap.dedent(data), "  "))
    return load_recipe(path)


@pytest.mark.parametrize(("data", "stages", "problem"), [
    ("sft: {sources: [{path: rows.jsonl, weight: 2, rows: 10}]}", None,
     "data.sft.sources.0: give either 'weight' (a share of the source) or 'rows'"),
    ("sft: {sources: [{path: rows.jsonl, columns: {chosen: good}, format: messages}]}", None,
     "data.sft.sources.0: columns: format 'messages' has no field 'chosen'; its fields are messages"),
    ("sft: {sources: [{path: rows.jsonl, columns: {answer: a}}]}", None, "data.sft.sources.0.columns.answer.[key]"),
    ("sft: {sources: [{path: rows.jsonl, split: test}]}", None, "a local file has one split, 'train'"),
    ("sft: {sources: [{path: rows.jsonl, split: 'train[:x]'}]}", None, "not a split: 'train[:x]'"),
    ("sft: {sources: [{path: rows.jsonl, subset: en}]}", None, "subset: only a hub dataset has subsets"),
    ("sft: {sources: [{path: rows.txt}]}", None, "cannot tell the file type of rows.txt"),
    ("sft: {sources: [{path: folder.jsonl}]}", None, "data.sft.sources.0.path: folder.jsonl is a folder, not a data"),
    ("sft: {sources: [{path: rows.jsonl, format: preference}]}", None,
     "data.sft.sources: source 0 (rows.jsonl): an sft stage reads messages, prompt_completion, instruction rows, "
     "not preference rows"),
    ("dpo: {sources: [{path: rows.jsonl, format: messages}]}", "[{type: dpo}]",
     "source 0 (rows.jsonl): a dpo stage reads preference rows (prompt, chosen, rejected), not 'messages'"),
    ("dpo: {sources: [{path: rows.jsonl}], packing: true}", "[{type: dpo}]",
     "data.dpo.packing: unknown key; allowed here: eval_fraction, sources"),
    ("on_bad_row: skip\nsft: {sources: [{path: rows.jsonl}]}", None, "data.on_bad_row: Input should be 'fail' or"),
    ("on_too_long: cut\nsft: {sources: [{path: rows.jsonl}]}", None, "data.on_too_long: Input should be 'drop',"),
    ("sft: {sources: [{path: rows.jsonl, eval_fraction: 1.0}]}", None, "data.sft.sources.0.eval_fraction"),
])
def test_bad_data_keys_fail_at_load_naming_the_key(tmp_path, monkeypatch, data, stages, problem):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load(tmp_path, data, stages or "[{type: sft}]")
    assert problem in str(info.value)


def test_a_full_data_section_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load(tmp_path, """\
        max_seq_len: 512
        on_too_long: truncate
        on_bad_row: drop
        num_proc: 4
        cache: false
        sft:
          packing: true
          eval_fraction: 0.05
          sources:
            - {path: rows.jsonl, format: instruction, columns: {instruction: question, output: answer}, rows: 100}
            - {hub: HuggingFaceH4/ultrachat_200k, split: 'train_sft[:10%]', weight: 0.5, eval_fraction: 0.01}
            - {hub: org/data, subset: en, split: train}
        """)
    sources = recipe.data.sft.sources
    assert [s.name for s in sources] == ["rows.jsonl", "HuggingFaceH4/ultrachat_200k[train_sft[:10%]]",
                                         "org/data/en[train]"]
    assert sources[0].columns == {"instruction": "question", "output": "answer"} and sources[0].rows == 100
