"""The recipe reaches the model: the LoRA section (groups, ranks, dropout per group, the router switch) and a
stage's memory settings."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from finetune import model as models
from finetune.cli import main
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
for repo_id in sys.argv[2:]:
    try:
        print(prepare_base(ModelSpec(name_or_path=repo_id), Path(sys.argv[1]), 0))
    except FinetuneError as e:
        print("error:", e)
"""


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory):
    """The tiny Mixtral as the hub holds 8x7B: numbered shards and model.safetensors.index.json."""
    return build_tiny_mixtral(tmp_path_factory.mktemp("sharded"), seed=3, max_shard_size="8MB")


def _hub_cache(hub, repo_id: str, files: dict[str, bytes], listed: list[str]):
    """A repo in a Hugging Face cache laid out as huggingface_hub lays it out: blobs, a snapshot folder of links to
    them, refs/main naming the commit, and the commit's file listing (trees/<commit>.json), which snapshot_download
    consults offline to refuse a snapshot that lacks a file it was asked for."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for folder in (snapshot, repo / "blobs", repo / "refs", repo / "trees"):
        folder.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(commit)
    listing = {name: {"size": len(files.get(name, b"")) or 2**30, "blob_id": "0" * 40} for name in listed}
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


def test_a_hub_id_resolves_from_the_cache_without_its_consolidated_weights_or_is_one_clear_error(tmp_path,
                                                                                                  sharded_base):
    """No network here: a hub endpoint that accepts connections and never answers, the worst way a hub cannot be
    reached (a closed port, no route or HF_HUB_OFFLINE=1 fail at once, and take the same way: the cache is read).
    The question for the commit has the hub's metadata timeout (1 s here), where snapshot_download alone waits
    forever. One child process answers for three repos, since each costs seconds of imports:
    - one cached as `hf download --include '*.json' 'model*.safetensors'` (the error's advice) leaves it: the
      shards but not the consolidated.safetensors that the repo's listing also names (asking for every
      *.safetensors, the cache would be refused as incomplete);
    - one cached with both kinds of weights: the loader reads the shards the index names;
    - one not cached: a one-line error with the advice."""
    hub = tmp_path / "hub"
    files = {p.name: p.read_bytes() for p in sharded_base.iterdir()}
    assert len([name for name in files if name.startswith("model-")]) > 1
    files["params.json"] = b"{}"  # mistral's own config, a json file like the others
    listed = [*files, "consolidated.safetensors", "tokenizer.model"]
    shards_only = _hub_cache(hub, "mistralai/Mixtral-8x7B-v0.1", files, listed)
    both = _hub_cache(hub, "mistralai/Mixtral-8x7B-Instruct-v0.1",
                      {**files, "consolidated.safetensors": b"not read"}, listed)
    repos = ["mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mixtral-8x22B-v0.1"]
    with socket.socket() as stalled:  # the kernel completes the connections; nothing ever answers
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(16)
        env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_ENDPOINT": f"http://127.0.0.1:{stalled.getsockname()[1]}",
               "HF_HUB_ETAG_TIMEOUT": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        done = subprocess.run([sys.executable, "-c", _PREPARE, str(tmp_path / "run"), *repos], env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[:2] == [str(shards_only), str(both)], done.stdout + done.stderr[-2000:]
    assert lines[2].startswith("error: model.name_or_path: 'mistralai/Mixtral-8x22B-v0.1' is not a local folder, "
                               "and getting it from the Hugging Face hub failed (ReadTimeout: "), lines[2]
    assert "download it first (hf download mistralai/Mixtral-8x22B-v0.1 --include '*.json' 'model*.safetensors')" \
        in lines[2] and len(lines) == 3
    plain = lambda path: ModelSpec(name_or_path=str(path), compute_dtype="float32", quantization=None)  # noqa: E731
    model, _ = models.load_base(plain(both), both, "cpu")
    reference, _ = models.load_base(plain(sharded_base), sharded_base, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_the_hub_download_asks_for_the_indexed_weights_only(tmp_path, sharded_base):
    """What snapshot_download would fetch from a repo that holds the weights twice, as mistralai's do: the json
    files, then the shards the index names (or model.safetensors when there is no index), never consolidated*."""
    from huggingface_hub.utils import filter_repo_objects

    from finetune.moe.loader import weight_files

    shards = sorted(p.name for p in sharded_base.glob("model-*.safetensors"))
    repo = [".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors.index.json",
            *shards, "consolidated.safetensors", *(f"consolidated-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
            "params.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"]
    fetch = lambda patterns: list(filter_repo_objects(repo, allow_patterns=patterns))  # noqa: E731
    assert fetch(["*.json"]) == ["config.json", "generation_config.json", "model.safetensors.index.json",
                                 "params.json", "tokenizer.json", "tokenizer_config.json"]
    assert fetch(weight_files(sharded_base)) == shards
    single = tmp_path / "single"  # a repo without an index: its one file
    single.mkdir()
    assert weight_files(single) == ["model.safetensors"]
    assert fetch(weight_files(single)) == [] and "model.safetensors" not in repo  # a name, not a pattern to widen


def test_a_damaged_weight_file_is_refused_before_the_run_folder_is_made(tmp_path, sharded_base, tiny_recipe, capsys):
    """A truncated shard (an interrupted download) is named by prepare_base, from the headers, before `finetune run`
    writes anything: no run folder is left behind."""
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded_base, damaged)
    shard = sorted(damaged.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(FinetuneError, match=rf"^model.name_or_path '{damaged}': {shard}: cannot be read \(truncated: "):
        models.prepare_base(ModelSpec(name_or_path=str(damaged)), tmp_path / "run", seed=0)
    recipe = tiny_recipe(tmp_path / "recipe.yaml", sft={"max_steps": 2})
    out = tmp_path / "out"
    # in this process: the error is raised before anything trains, and a child costs seconds of imports
    assert main(["run", str(recipe), f"output_dir={out}", f"model.name_or_path={damaged}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.split(r"[\r\n]", err.strip())[-1].startswith(
        f"error: model.name_or_path '{damaged}': {shard}: cannot be read (truncated: "), err[-3000:]
    assert not out.exists()
