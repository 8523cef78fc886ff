"""Export: a streaming merge in the original Mixtral layout, verified every time; adapters alone; chat."""

import io
import json
import shutil
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from finetune import model as models
from finetune.cli import main
from finetune.export import ExportError, RunFiles, _prompts, export_adapter, export_merged, verify_export
from finetune.recipe.schema import LoraSpec, ModelSpec



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
