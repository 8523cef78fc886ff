"""Export: a streaming merge in the original Mixtral layout, verified every time; adapters alone; chat."""

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from finetune import model as models
from finetune.cli import main
from finetune.export import (ExportError, RunFiles, _add_legacy_config_keys, _prompts, check_out_dir, export_adapter,
                             export_merged, verify_export)
from finetune.recipe.schema import LoraSpec, ModelSpec
from finetune.tokenizer import CHAT_TEMPLATE, mixtral_tokenizer_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_recipe) -> RunFiles:
    folder = tmp_path_factory.mktemp("run")
    recipe = tiny_recipe(folder / "recipe-in.yaml", seed=5, sft={"max_steps": 8, "batch_size": 8})
    assert main(["run", str(recipe), f"output_dir={folder}"]) == 0  # in this process: imports cost seconds
    return RunFiles.read(folder)


def logits(model, run: RunFiles) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    with torch.no_grad():
        return [model.eval()(input_ids=p).logits for p in _prompts(AutoTokenizer.from_pretrained(run.tokenizer))]


def test_streaming_merge_writes_the_original_layout_in_shards(run, tmp_path):
    out = tmp_path / "export"
    record = export_merged(run, out, dtype="float32", max_shard_size="6MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").is_file()
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in weight_map
    assert "model.layers.0.block_sparse_moe.gate.weight" in weight_map
    # never the whole model at once: at most one shard plus the tensor being added (the 16 MB embedding)
    assert record["merge_peak_bytes_held"] < 0.6 * record["bytes_written"]

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base_model, dtype=torch.float32),
                                      run.adapter)
    for a, b in zip(logits(merged, run), logits(stock, run)):
        assert (a - b).abs().max() < 1e-3

    base = load_file(run.base_model / "model.safetensors")
    for key in [k for k in weight_map if ".experts." in k or "_proj" in k]:
        tensor = load_file(out / weight_map[key])[key]
        assert not torch.equal(tensor, base[key].float()), f"{key} unchanged by the merge"


def test_dequantized_base_reproduces_the_trained_4bit_model(run, tmp_path):
    export_merged(run, tmp_path / "export", dtype="float32", base="dequantized")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    spec = ModelSpec.model_validate(run.recipe["model"])
    trained = models.load_adapter(models.load_base(spec, run.base_model, "cpu")[0], run.adapter,
                                  LoraSpec.model_validate(run.recipe["lora"]), trainable=False)
    for a, b in zip(logits(merged, run), logits(trained, run)):
        assert (a - b).abs().max() < 1e-4


def test_a_failed_check_leaves_the_previous_export_whole(run, tmp_path):
    out = tmp_path / "export"
    export_merged(run, out, dtype="float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="logits differ from base\\+adapter"):
        export_merged(run, out, dtype="bfloat16", tolerance=1e-9)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob("*.partial"))


def test_an_expert_the_adapter_left_unchanged_fails_the_export(run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(run.adapter, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    crippled = RunFiles(run.run_dir, run.base_model, adapter, run.tokenizer, run.recipe)
    with pytest.raises(ExportError, match="layers.1.block_sparse_moe.experts.3.w2.weight"):
        export_merged(crippled, tmp_path / "export", dtype="float32")
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.partial").exists()


def test_a_truncated_shard_fails_verification(run, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "export"
    export_merged(run, out, dtype="float32", max_shard_size="6MB")
    reference = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), run)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert verify_export(out, tokenizer, [r.float() for r in reference], 1e-6)["max_abs_logit_difference"] == 0
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ExportError, match="does not load with stock transformers"):
        verify_export(out, tokenizer, reference, 1e-3)


def test_adapter_only_export_loads_with_stock_peft(run, tmp_path):
    out = tmp_path / "adapter"
    record = export_adapter(run, out, dtype="float32")
    assert record["max_abs_logit_difference"] < 1e-5
    assert load_file(out / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.block_sparse_moe.experts.5.w1.lora_A.weight"].dtype == torch.float32
    export_adapter(run, tmp_path / "bf16", dtype="bfloat16")
    tensors = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base_model, dtype=torch.float32),
                                      tmp_path / "bf16")
    assert all(torch.isfinite(x).all() for x in logits(stock, run))
    for folder in (out, tmp_path / "bf16"):  # the tokenizer as in a merged export (see the tests below)
        assert (folder / "tokenizer.model").read_bytes() == mixtral_tokenizer_file().read_bytes()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_export_and_chat_from_the_command_line(run, tmp_path, capsys, monkeypatch):
    # both commands in this process (a child process costs seconds of imports)
    out = tmp_path / "export"
    assert main(["export", str(run.run_dir), "--out", str(out), "--dtype", "float32"]) == 0
    stdout, stderr = capsys.readouterr()
    assert f"exported to {out}" in stdout
    # progress bars with rate and ETA on stderr: the streaming merge over the base's tensors, and transformers'
    # own over the weights of each reload (base+adapter for the reference, the export for the verification)
    assert "[export] merging: 100%" in stderr and "tensor/s]" in stderr
    assert stderr.count("Loading weights: 100%") >= 2 and "[export] merging:" not in stdout
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of Peru?\n/reset\nCount from 2 to 5.\n/exit\n"))
    assert main(["chat", str(out), "--max-new-tokens", "8"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("assistant> ") == 2 and stdout.count("you> ") == 4


def folder_state(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_an_out_that_would_delete_the_run_or_a_users_files(run, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    (tmp_path / "staged.partial").mkdir()
    (tmp_path / "staged.partial" / "notes.txt").write_text("mine too")
    (tmp_path / "a-file").write_text("not a folder")
    before, user_files = folder_state(run.run_dir), folder_state(tmp_path)
    for out, why in [(run.run_dir, "is the run folder"), (run.run_dir / "sft", "inside the run folder"),
                     (run.run_dir / "sft" / "adapter", "inside the run folder"),
                     (run.run_dir.parent, "holds the run folder"), (precious, "not an earlier export \\(notes.txt\\)"),
                     (tmp_path / "staged", "staged.partial holds files that are not an earlier export"),
                     (tmp_path / "a-file", "is a file"), (tmp_path / "..", "by its name, not as . or ..")]:
        for mode in ([], ["--adapter-only"]):
            assert main(["export", str(run.run_dir), "--out", str(out), "--dtype", "float32", *mode]) == 2
            stderr = capsys.readouterr().err
            assert stderr.startswith(f"error: export folder {out}") and re.search(why, stderr), stderr
    assert folder_state(run.run_dir) == before and folder_state(tmp_path) == user_files
    # what may be replaced: a new or empty folder, and an earlier export (this tool's marker, or the model card
    # that exports wrote before the marker)
    (tmp_path / "empty").mkdir()
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "README.md").write_text("# Fine-tune of tiny-mixtral\n")
    for out in ("new", "empty", "earlier"):
        check_out_dir(run.run_dir, tmp_path / out)
    check_out_dir(run.run_dir, run.run_dir / "export")


def test_a_moved_or_copied_run_reads_its_own_files(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "export*"))
    files = RunFiles.read(copy)  # the original still exists: its files must not be used
    assert [files.base_model, files.adapter, files.tokenizer] == [copy / "base-model", copy / "sft" / "adapter",
                                                                  copy / "tokenizer"]
    # moved: run.json as the run wrote it where it no longer is
    moved = tmp_path / "moved"
    copy.rename(moved)
    record = (moved / "run.json").read_text()
    (moved / "run.json").write_text(record.replace(str(run.run_dir.resolve()), str(tmp_path / "gone")))
    assert RunFiles.read(moved).adapter == moved / "sft" / "adapter"
    assert main(["generate", str(moved), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    (moved / "sft" / "adapter" / "adapter_model.safetensors").unlink()
    for command in (["export", str(moved)], ["generate", str(moved), "--prompt", "Hi"]):
        assert main(command) == 2
        assert capsys.readouterr().err == (f"error: {moved / 'sft' / 'adapter' / 'adapter_model.safetensors'}: "
                                           f"missing (the run's final adapter, as {moved / 'run.json'} records it)\n")


def test_export_takes_the_runs_own_export_settings_unless_given(run, tmp_path, capsys):
    """`finetune export RUN` makes what the run's recipe says (export.dtype, max_shard_size, ...), not the schema's
    defaults; an option given wins, and each setting is printed with where it came from."""
    import yaml

    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "export*"))
    saved = yaml.safe_load((copy / "recipe.yaml").read_text())
    saved["export"].update(dtype="float32", max_shard_size="6MB", verify_tolerance=1e-3)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(saved))
    out = tmp_path / "export"
    assert main(["export", str(copy), "--out", str(out), "--base", "dequantized"]) == 0
    assert ("[export] dtype float32 (the run's export.dtype), base dequantized (given), max_shard_size 6MB (the "
            "run's export.max_shard_size), verify_tolerance 0.001 (the run's export.verify_tolerance)"
            in capsys.readouterr().out)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    assert {t.dtype for t in load_file(out / "model-00001-of-00004.safetensors").values()} == {torch.float32}
    assert json.loads((out / "verification.json").read_text())["base"] == "dequantized"

    saved["export"]["dtype"] = "float8"
    (copy / "recipe.yaml").write_text(yaml.safe_dump(saved))
    assert main(["export", str(copy), "--out", str(out), "--dtype", "float32"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {copy / 'recipe.yaml'}: export.dtype: Input should be")


def test_a_broken_run_record_is_a_clear_error(tmp_path, capsys):
    for text, why in [('{"recipe": ', "not the JSON a run writes \\(Expecting value: line 1"),
                      ("{}", "lacks recipe, base_model, tokenizer, final_adapter"), ("[]", "lacks recipe")]:
        (tmp_path / "run.json").write_text(text)
        for command in (["export", str(tmp_path)], ["generate", str(tmp_path), "--prompt", "Hi"]):
            assert main(command) == 2
            assert re.fullmatch(f"error: {re.escape(str(tmp_path / 'run.json'))}: {why}.*\n", capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


@pytest.mark.parametrize("command, why", [
    (["export", "RUN", "--max-shard-size", "abc"], "--max-shard-size: 'abc': expected a size such as 5GB"),
    (["export", "RUN", "--tolerance", "-1"], "--tolerance: '-1': expected a finite number > 0"),
    (["export", "RUN", "--tolerance", "0"], "--tolerance: '0': expected a finite number > 0"),
    (["generate", "RUN", "--prompt", "Hi", "--max-new-tokens", "-5"], "--max-new-tokens: must be 1 or more, got -5"),
    (["generate", "RUN", "--prompt", " "], "--prompt: empty"),
    (["chat", "RUN", "--temperature", "-1"], "--temperature: -1: must be 0 \\(greedy\\) or a positive number"),
    (["data", "RECIPE", "--examples", "-1"], "--examples: must be 0 or more, got -1"),
])
def test_bad_options_are_refused_when_parsing(command, why, capsys):
    with pytest.raises(SystemExit) as exit:
        main(command)
    assert exit.value.code == 2 and re.search(f"error: argument {why}", capsys.readouterr().err)


def test_bad_export_settings_are_refused_before_any_work(run, tmp_path):
    for settings, why in [({"tolerance": 0.0}, "tolerance 0.0: must be a finite number > 0"),
                          ({"tolerance": -1.0}, "tolerance -1.0"), ({"max_shard_size": "abc"}, "max shard size 'abc'")]:
        with pytest.raises(ExportError, match=re.escape(why)):
            export_merged(run, tmp_path / "export", dtype="float32", **settings)
    with pytest.raises(ExportError, match="tolerance 0.0"):
        export_adapter(run, tmp_path / "export", tolerance=0.0)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def float32_export(run, tmp_path_factory):
    """An export in several shards, made once; tests that change an export work on a copy."""
    out = tmp_path_factory.mktemp("exports") / "export"
    export_merged(run, out, dtype="float32", max_shard_size="6MB")
    return out


def child(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


STOCK_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tokenizer = AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
prompts = torch.load(sys.argv[2])
with torch.no_grad():
    logits = [model.eval()(input_ids=p).logits for p in prompts]
assert not [m for m in sys.modules if m.split(".")[0] == "finetune"]
torch.save({"logits": logits, "dtype": str(model.dtype), "padding_side": tokenizer.padding_side,
            "special": [tokenizer.bos_token, tokenizer.eos_token], "template": tokenizer.chat_template}, sys.argv[3])
"""


def test_the_merged_export_is_a_stock_mixtral_checkpoint(run, float32_export, tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, MixtralForCausalLM

    out = float32_export
    # loaded by a process that never imports finetune: what a serving stack does
    prompts = _prompts(AutoTokenizer.from_pretrained(run.tokenizer))
    torch.save(prompts, tmp_path / "prompts.pt")
    done = child(STOCK_LOAD, out, tmp_path / "prompts.pt", tmp_path / "loaded.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base_model, dtype=torch.float32),
                                      run.adapter)
    for a, b in zip(loaded["logits"], logits(stock, run)):
        assert (a - b).abs().max() < 1e-3
    # batched generation pads on the left, as Mixtral's own tokenizer; the chat template travels with it
    assert loaded["dtype"] == "torch.float32" and loaded["padding_side"] == "left"
    assert loaded["special"] == ["<s>", "</s>"] and "[INST]" in loaded["template"]

    # every tensor in exactly one shard, as the index says, under the names stock save_pretrained writes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    found, total = {}, 0
    for shard in sorted(out.glob("model-*-of-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                assert key not in found, f"{key} in {found.get(key)} and {shard.name}"
                found[key] = shard.name
                tensor = f.get_tensor(key)
                assert tensor.dtype == torch.float32, key
                total += tensor.numel() * tensor.element_size()
    assert index["weight_map"] == found and index["metadata"]["total_size"] == total
    MixtralForCausalLM(AutoConfig.from_pretrained(run.base_model)).save_pretrained(tmp_path / "stock",
                                                                                   max_shard_size="6MB")
    assert set(found) == set(json.loads((tmp_path / "stock" / "model.safetensors.index.json").read_text())[
        "weight_map"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["dtype"] == "float32" and "quantization_config" not in config
    legacy = {"rope_theta", "torch_dtype"}  # for transformers 4.x readers, see test_the_exported_config_...
    assert set(config) - legacy <= set(json.loads((tmp_path / "stock" / "config.json").read_text()))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def exported_state(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_killed_export_leaves_the_earlier_one_and_the_next_cleans_up(run, float32_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(float32_export, out)
    before = exported_state(out)
    worker = subprocess.Popen([sys.executable, "-m", "finetune.cli", "export", str(run.run_dir), "--out", str(out),
                               "--max-shard-size", "1MB"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    partial = tmp_path / "export.partial"
    deadline = time.monotonic() + 180
    while worker.poll() is None and not list(partial.glob("shard-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.kill()
    assert worker.wait() == -signal.SIGKILL  # killed mid-write, not finished
    assert exported_state(out) == before and list(partial.glob("shard-*"))
    export_merged(run, out, dtype="float32", max_shard_size="1MB")
    assert not partial.exists() and len(list(out.glob("model-*.safetensors"))) > 3


FULL_DISK = """
import resource, signal, sys
from finetune.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_or_unwritable_folder_is_a_clear_error_and_keeps_the_earlier_export(run, float32_export,
                                                                                       tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(float32_export, out)
    before = exported_state(out)
    for mode in ([], ["--adapter-only"]):
        done = child(FULL_DISK, "export", run.run_dir, "--out", out, "--dtype", "float32", *mode)
        assert done.returncode == 2, done.stderr[-3000:]
        error = done.stderr.splitlines()[-1]
        assert error.startswith(f"error: export folder {out}: ") and "too large" in error, error
        assert error.endswith("; nothing was replaced")
        assert exported_state(out) == before and not (tmp_path / "export.partial").exists()
    (tmp_path / "a-file").write_text("not a folder")
    for mode in ([], ["--adapter-only"]):
        assert main(["export", str(run.run_dir), "--out", str(tmp_path / "a-file" / "export"), *mode]) == 2
        assert capsys.readouterr().err.startswith(f"error: export folder {tmp_path / 'a-file' / 'export'}: "
                                                  "[Errno 20] Not a directory")


def quickstart_conversations() -> list[list[dict]]:
    """Every conversation of the quickstart data: SFT rows, and each preference row's prompt with either answer."""
    rows = [json.loads(line) for name in ("sft", "preference")
            for line in (ROOT / "data" / "quickstart" / f"{name}.jsonl").read_text().splitlines()]
    conversations = [row["messages"] for row in rows if "messages" in row]
    conversations += [row["prompt"] + row[answer]
                      for row in rows if "prompt" in row for answer in ("chosen", "rejected")]
    assert len(conversations) > 100
    return conversations


def test_the_exported_tokenizer_is_laid_out_as_mixtrals_and_encodes_as_the_runs(run, float32_export):
    """What transformers 4.x and tools that read tokenizer.model need (Mixtral's own folder holds the same), and the
    same ids from transformers 5 as the run's tokenizer. transformers 4.57 on this folder was checked by hand (see the
    export's _save_serving_tokenizer): LlamaTokenizerFast would load in 4.x but changes ids in 5, so the class is
    PreTrainedTokenizerFast."""
    import sentencepiece
    from transformers import AutoTokenizer

    out = float32_export
    # the run's folder has no tokenizer.model (transformers 5 saves none): mistral-common's is the one our rebuild uses
    assert not (run.tokenizer / "tokenizer.model").exists()
    assert (out / "tokenizer.model").read_bytes() == mixtral_tokenizer_file().read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"] == CHAT_TEMPLATE
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]  # tokenizers < 0.20 reads only these
    assert merges[0] == "▁ t" and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)

    trained, exported = AutoTokenizer.from_pretrained(run.tokenizer), AutoTokenizer.from_pretrained(out)
    assert exported.chat_template == CHAT_TEMPLATE and exported.padding_side == "left"
    conversations = quickstart_conversations()
    texts = [message["content"] for conversation in conversations for message in conversation]
    texts += [" leading space", "  two", "\n newline first", "a</s>b"]
    assert exported(texts)["input_ids"] == trained(texts)["input_ids"]
    for conversation in conversations:
        assert (exported.apply_chat_template(conversation, tokenize=True, return_dict=False)
                == trained.apply_chat_template(conversation, tokenize=True, return_dict=False))
        prompt = dict(tokenize=True, return_dict=False, add_generation_prompt=True)
        assert (exported.apply_chat_template(conversation[:-1], **prompt)
                == trained.apply_chat_template(conversation[:-1], **prompt))
    # the SentencePiece file encodes as the exported tokenizer does (text as text: SentencePiece has no control
    # strings)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.encode(texts) == exported(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_a_tokenizer_model_of_another_vocabulary_fails_the_export(run, tmp_path):
    import sentencepiece

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(run.tokenizer, tokenizer)
    texts = [m["content"] for conversation in quickstart_conversations() for m in conversation]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "other"),
                                             vocab_size=300, model_type="bpe", minloglevel=2)
    shutil.copyfile(tmp_path / "other.model", tokenizer / "tokenizer.model")
    other = RunFiles(run.run_dir, run.base_model, run.adapter, tokenizer, run.recipe)
    with pytest.raises(ExportError, match=re.escape(f"{tokenizer / 'tokenizer.model'}: not the vocabulary of the "
                                                    f"run's tokenizer {tokenizer} (300 pieces against 32000")):
        export_adapter(other, tmp_path / "export", dtype="float32")
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.partial").exists()


def test_the_exported_config_keeps_the_keys_transformers_4_reads(run, float32_export, tmp_path):
    """transformers 5 writes rope_parameters and dtype; 4.x readers look for rope_theta and torch_dtype and fall back
    to their own defaults without them. transformers 5 reads the config with the keys as the same config."""
    from transformers import AutoConfig

    config = json.loads((float32_export / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e6
    assert config["torch_dtype"] == config["dtype"] == "float32" and "rope_scaling" not in config  # a default rope
    loaded = AutoConfig.from_pretrained(float32_export).to_dict()
    base = AutoConfig.from_pretrained(run.base_model).to_dict()
    assert {k: v for k, v in loaded.items() if k not in ("dtype", "_name_or_path")} == {
        k: v for k, v in base.items() if k not in ("dtype", "_name_or_path")}

    # a rope other than the default also goes where 4.x reads it, as rope_scaling
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                 "original_max_position_embeddings": 64}
    for key in ("rope_theta", "torch_dtype"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    before = AutoConfig.from_pretrained(tmp_path).to_dict()
    _add_legacy_config_keys(tmp_path / "config.json")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 5e5 and written["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert AutoConfig.from_pretrained(tmp_path).to_dict() == before
