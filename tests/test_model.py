"""The recipe reaches the model: the LoRA section (groups, ranks, dropout per group, the router switch) and a
stage's memory settings."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from finetune import model as models
from finetune.errors import FinetuneError
from finetune.moe import ExpertLoraLayer
from finetune.moe.tiny import build_tiny_mixtral
from finetune.moe.grouped import DEFAULT_CHUNKS
from finetune.moe.quantized_experts import QuantizedExperts
from finetune.recipe.schema import LoraSpec, ModelSpec, SFTStage


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("tiny"), seed=3)


def attach(base_path, **lora):
    spec = ModelSpec(name_or_path=str(base_path), compute_dtype="float32", device="cpu")
    base, report = models.load_base(spec, base_path, "cpu")
    assert "experts" in report and "yes" in report
    return models.attach_new_adapter(base, LoraSpec(**lora))


def test_expert_dropout_and_rank_are_set_per_group(base_path):
    model = attach(base_path, r=8, alpha=16, dropout=0.1, experts_r=4, experts_alpha=4, experts_dropout=0.3)
    experts = [m for m in model.modules() if isinstance(m, ExpertLoraLayer)]
    assert len(experts) == 2
    for layer in experts:
        assert isinstance(layer.lora_dropout["default"], nn.Dropout) and layer.lora_dropout["default"].p == 0.3
        assert layer.r["default"] == 4 and layer.scaling["default"] == 1.0
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_dropout["default"].p == 0.1 and q.r["default"] == 8


def test_router_frozen_by_default_and_trained_in_full_on_request(base_path):
    frozen = models.trainable_summary(attach(base_path))
    full = models.trainable_summary(attach(base_path, router="full"))
    router_line = lambda text: next(line for line in text.splitlines() if line.startswith("router"))  # noqa: E731
    assert router_line(frozen).split()[-1] == "0"
    assert int(router_line(full).split()[-1].replace(",", "")) > 0


def test_attention_only(base_path):
    model = attach(base_path, experts=False)
    assert not any(isinstance(m, ExpertLoraLayer) for m in model.modules())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_cuda_requested_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="model.device is 'cuda'"):
        models.resolve_device(ModelSpec(name_or_path="x", device="cuda"))


def test_each_launched_process_takes_its_own_gpu(monkeypatch):
    """Under a launcher, CUDA means the process's own device, cuda:LOCAL_RANK; the CPU stays the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert models.resolve_device(ModelSpec(name_or_path="x", device="auto")) == "cuda:3"
    assert models.resolve_device(ModelSpec(name_or_path="x", device="cuda")) == "cuda:3"
    assert models.resolve_device(ModelSpec(name_or_path="x", device="cpu")) == "cpu"
    monkeypatch.delenv("LOCAL_RANK")
    assert models.resolve_device(ModelSpec(name_or_path="x", device="cuda")) == "cuda:0"


def test_a_stage_sets_the_expert_kernel_pieces_it_asks_for(base_path, capsys):
    model = attach(base_path)
    experts = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    assert experts and experts[0].intermediate_dim == 256  # pieces of whole 64-row blocks: 1, 2 or 4
    for asked, pieces in ((None, 2), (1, 1), (3, 2), (8, 4)):
        models.apply_stage_memory_settings(model, SFTStage(type="sft", expert_chunks=asked), "cpu")
        assert {m.dequant_chunks for m in experts} == {asked}
        expected = "default" if asked is None else f"asked {asked}"
        assert f"dequantizes each 4-bit expert stack in {pieces} pieces ({expected})" in capsys.readouterr().out
    # the recipe reference names the kernel's default, from its one definition
    assert f"DEFAULT_CHUNKS ({DEFAULT_CHUNKS})" in SFTStage.model_fields["expert_chunks"].description


@pytest.mark.parametrize("compute_dtype,quantization", [
    ("bfloat16", {"quant_type": "nf4", "double_quant": True}), ("float16", {"quant_type": "nf4", "double_quant": False}),
    ("float32", {"quant_type": "fp4", "double_quant": True}), ("bfloat16", {"quant_type": "fp4", "double_quant": False}),
    ("float32", None), ("bfloat16", None)])
def test_each_compute_dtype_and_quantization_loads_with_finite_logits(base_path, compute_dtype, quantization):
    spec = ModelSpec(name_or_path=str(base_path), compute_dtype=compute_dtype, quantization=quantization, device="cpu")
    base, report = models.load_base(spec, base_path, "cpu")
    experts = base.model.layers[0].mlp.experts
    if quantization:
        assert isinstance(experts, QuantizedExperts) and experts.gate_up_proj.quant_type == quantization["quant_type"]
        assert experts.gate_up_proj.double_quant == quantization["double_quant"]
    else:
        assert experts.gate_up_proj.dtype == models.DTYPES[compute_dtype]
    with torch.no_grad():
        logits = base(torch.arange(1, 33)[None]).logits
    assert logits.dtype == models.DTYPES[compute_dtype] and torch.isfinite(logits).all()


def test_a_base_that_is_not_mixtral_is_refused_naming_the_key(base_path, tmp_path):
    other = tmp_path / "llama"
    shutil.copytree(base_path, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    spec = ModelSpec(name_or_path=str(other))
    with pytest.raises(FinetuneError, match=rf"^model.name_or_path '{other}': {other}/config.json: model_type is "
                                            r"'llama', not 'mixtral'"):
        models.prepare_base(spec, tmp_path / "run", seed=0)
    with pytest.raises(FinetuneError, match=r"^model.name_or_path .*model_type is 'llama'"):
        models.load_base(spec, other, "cpu")


_PREPARE = """
import sys
from pathlib import Path
from finetune.errors import FinetuneError
from finetune.model import prepare_base
from finetune.recipe.schema import ModelSpec
try:
    print(prepare_base(ModelSpec(name_or_path="mistralai/Mixtral-8x7B-v0.1"), Path(sys.argv[1]), 0))
except FinetuneError as e:
    print("error:", e)
"""


def test_a_hub_id_without_network_or_cache_is_one_clear_error(tmp_path, base_path):
    """No network here: a hub endpoint that refuses connections (a closed local port), as a machine without network
    meets it (HF_HUB_OFFLINE=1 fails the same way, an OSError, without trying; one child process per case costs
    seconds of imports, so this one stands for both)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    run = lambda: subprocess.run([sys.executable, "-c", _PREPARE, str(tmp_path / "run")], env=env,  # noqa: E731
                                 capture_output=True, text=True, timeout=120)
    done = run()
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.strip()
    assert out.startswith("error: model.name_or_path: 'mistralai/Mixtral-8x7B-v0.1' is not a local folder"), out
    assert "download it first (hf download mistralai/Mixtral-8x7B-v0.1" in out and "\n" not in out
    # the advice works: once it is in the cache (as `hf download` leaves it), the same recipe finds it offline
    repo = tmp_path / "hf" / "hub" / "models--mistralai--Mixtral-8x7B-v0.1"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(base_path, repo / "snapshots" / ("0" * 40))
    done = run()
    assert done.stdout.strip() == str(repo / "snapshots" / ("0" * 40)), done.stdout + done.stderr[-2000:]
