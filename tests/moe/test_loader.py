import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import MixtralForCausalLM

from finetune.errors import FinetuneError
from finetune.moe.dequantize import dequantized_state_dict
from finetune.moe.loader import check_weight_files, load_mixtral
from finetune.moe.quantized_experts import QuantizedExperts
from finetune.moe.report import measure_parts


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unquantized_load_equals_stock_from_pretrained(tiny_path, tokens, dtype):
    ours, _ = load_mixtral(tiny_path, quant=None, compute_dtype=dtype)
    stock = MixtralForCausalLM.from_pretrained(tiny_path, dtype=dtype).eval()
    assert torch.equal(_logits(ours, tokens[:, :32]), _logits(stock, tokens[:, :32]))


def test_tied_embeddings(tied_tiny_path, tokens):
    ours, _ = load_mixtral(tied_tiny_path, quant="nf4", compute_dtype=torch.float32)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    stock = MixtralForCausalLM(ours.config)
    stock.load_state_dict(dequantized_state_dict(ours))
    torch.testing.assert_close(_logits(ours, tokens[:, :32]), _logits(stock.eval(), tokens[:, :32]), rtol=1e-5, atol=1e-5)


def test_quantized_load_equals_stock_with_the_dequantized_weights(tiny_path, tokens):
    ours, _ = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.float32)
    assert all(isinstance(layer.mlp.experts, QuantizedExperts) for layer in ours.model.layers)
    assert all(isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit) for layer in ours.model.layers)
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # really quantized on CPU
    stock = MixtralForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    original = _logits(stock, tokens[:, :32])
    stock.load_state_dict(dequantized_state_dict(ours))
    # identical weights and float32 ops: differences are summation order only
    torch.testing.assert_close(_logits(ours, tokens[:, :32]), _logits(stock, tokens[:, :32]), rtol=1e-5, atol=1e-5)
    # and the 4-bit model is still the same model: a random network amplifies NF4's ~10% weight error to about
    # 0.5 relative logit error over two layers, while a model with other weights (another seed) differs by ~1.4
    error = (_logits(ours, tokens[:, :32]) - original).abs().mean() / original.abs().mean()
    assert error < 0.7


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_report_counts_the_actual_tensors(tiny_path):
    model, report = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.bfloat16)
    experts = _bytes(t for layer in model.model.layers for t in (*layer.mlp.experts.parameters(), *layer.mlp.experts.buffers()))
    attention = 0
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            qs = proj.weight.quant_state
            attention += _bytes([proj.weight, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code])
    router = _bytes(layer.mlp.gate.weight for layer in model.model.layers)
    assert report.parts["experts"].bytes == experts and report.parts["experts"].quantized
    assert report.parts["attention"].bytes == attention and report.parts["attention"].quantized
    assert report.parts["router"].bytes == router and not report.parts["router"].quantized
    assert report.parts["embeddings"].bytes == _bytes([model.model.embed_tokens.weight])
    assert report.parts["lm_head"].bytes == _bytes([model.lm_head.weight])
    assert report.total_bytes == sum(p.bytes for p in report.parts.values())
    assert report.peak_bytes >= report.total_bytes
    assert "experts" in report.format()

    plain, plain_report = load_mixtral(tiny_path, quant=None, compute_dtype=torch.bfloat16)
    assert plain_report.total_bytes == _bytes([*plain.parameters(), *plain.buffers()])
    assert plain_report.parts["experts"].bytes == _bytes(p for layer in plain.model.layers for p in layer.mlp.experts.parameters())
    # 4-bit with double quant: ~0.52 bytes per weight versus 2 in bf16
    assert report.parts["experts"].bytes < 0.3 * plain_report.parts["experts"].bytes
    assert measure_parts(model) == report.parts


def test_streaming_peak_stays_near_quantized_size(tiny_path):
    _, report = load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.bfloat16)
    _, plain = load_mixtral(tiny_path, quant=None, compute_dtype=torch.bfloat16)
    one_layer_experts_bf16 = plain.parts["experts"].bytes // 2
    # peak = quantized model + one layer's experts in bf16 (filled in place), never the whole bf16 model
    assert report.peak_bytes <= report.total_bytes + one_layer_experts_bf16 + 2**16


def test_loading_shows_a_progress_bar_over_layers_on_stderr(tiny_path, capsys):
    load_mixtral(tiny_path, quant="nf4", compute_dtype=torch.float32)
    out, err = capsys.readouterr()
    assert "[model] loading, quantizing to nf4: 100%" in err and "2/2 [" in err and "layer/s]" in err
    assert "[model]" not in out
    # TQDM_DISABLE=1 (read by tqdm when it is imported) turns the bars off for a log that wants none
    quiet = subprocess.run([sys.executable, "-c", f"from finetune.moe.loader import load_mixtral; "
                            f"load_mixtral({str(tiny_path)!r})"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TQDM_DISABLE": "1"})
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "[model] loading" not in quiet.stderr


# A checkpoint laid out as the hub has Mixtral-8x7B: numbered shards in the state dict's order (so a layer's experts
# straddle two shards), an index with only total_size, a config.json written by transformers 4.36.
def _save_hub_layout(tensors: dict, folder, source_config, shards: int = 5, config_edit=None):
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    config = json.loads((source_config / "config.json").read_text())
    config.pop("dtype"), config.pop("rope_parameters")
    config.update(torch_dtype="bfloat16", rope_theta=1e6, transformers_version="4.36.0.dev0")
    (config_edit or (lambda c: None))(config)
    (folder / "config.json").write_text(json.dumps(config))
    keys, weight_map = list(tensors), {}
    per = -(-len(keys) // shards)
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}, str(folder / name), {"format": "pt"})
        weight_map.update({k: name for k in keys[i * per:(i + 1) * per]})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _read_checkpoint(path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def _in_model_order(tensors: dict) -> dict:
    """Embeddings, then each layer in numeric order (experts first, as transformers 4 saved them), then the head."""
    def rank(key):
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        return (1, int(layer[1]), key) if layer else (0 if "embed" in key else 2, 0, key)
    return {k: tensors[k] for k in sorted(tensors, key=rank)}


@pytest.fixture(scope="module")
def checkpoint(tiny_path) -> dict:
    return _in_model_order(_read_checkpoint(tiny_path))


def test_hub_layout_quantizes_every_expert_from_its_shard(tiny_path, checkpoint, tmp_path):
    import bitsandbytes.functional as bnbf

    path = _save_hub_layout(checkpoint, tmp_path / "hub", tiny_path)
    straddling = {json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][
        f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(8)}
    assert len(straddling) == 2  # the layout under test: one layer's experts read from two shards
    model, report = load_mixtral(path, quant="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    for layer, block in enumerate(model.model.layers):
        expert = lambda e, w: checkpoint[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]  # noqa: E731
        gate_up = torch.stack([torch.cat([expert(e, "w1"), expert(e, "w3")]) for e in range(8)])
        down = torch.stack([expert(e, "w2") for e in range(8)])
        for stack, original in ((block.mlp.experts.gate_up_proj, gate_up), (block.mlp.experts.down_proj, down)):
            packed, state = bnbf.quantize_4bit(original, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert torch.equal(stack.data, packed.reshape(-1)) and torch.equal(stack.absmax, state.absmax)
            assert torch.equal(stack.nested_absmax, state.state2.absmax)
        q = block.self_attn.q_proj.weight
        packed, _ = bnbf.quantize_4bit(checkpoint[f"model.layers.{layer}.self_attn.q_proj.weight"], blocksize=64,
                                       compress_statistics=True, quant_type="nf4")
        assert torch.equal(q.reshape(-1), packed.reshape(-1))
        assert torch.equal(block.mlp.gate.weight, checkpoint[f"model.layers.{layer}.block_sparse_moe.gate.weight"])
    assert model.config.rope_parameters["rope_theta"] == 1e6  # read from a transformers 4 config
    one_layer_experts_bf16 = (gate_up.numel() + down.numel()) * 2
    assert report.peak_bytes <= report.total_bytes + one_layer_experts_bf16 + 2**16


def _fused(tiny_path, folder):
    stock = MixtralForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16)
    stock.save_pretrained(folder, save_original_format=False)
    assert any("mlp.experts.gate_up_proj" in k for k in _read_checkpoint(folder))
    return folder


def _single_file(tensors, tiny_path, folder):
    from safetensors.torch import save_file

    folder.mkdir()
    shutil.copy(tiny_path / "config.json", folder)
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    return folder


@pytest.mark.parametrize("layout", ["fused", "single file", "float32", "float16", "rotary inv_freq"])
def test_other_checkpoint_layouts_load_the_same_model(tiny_path, checkpoint, tmp_path, tokens, layout):
    if layout == "fused":  # transformers 5's own layout: save_pretrained(save_original_format=False)
        path = _fused(tiny_path, tmp_path / "fused")
    elif layout == "single file":
        path = _single_file(checkpoint, tiny_path, tmp_path / "single")
    elif layout == "rotary inv_freq":  # older checkpoints carry the rotary buffer; the model computes its own
        path = _save_hub_layout({**checkpoint, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)},
                                tmp_path / "inv_freq", tiny_path)
    else:
        dtype = getattr(torch, layout)
        path = _save_hub_layout({k: v.to(dtype) for k, v in checkpoint.items()}, tmp_path / layout, tiny_path, 3)
    ours, _ = load_mixtral(path, quant=None, compute_dtype=torch.float32)
    reference, _ = load_mixtral(tiny_path, quant=None, compute_dtype=torch.float32)
    if layout == "float16":  # bf16 -> fp16 rounds the smallest weights (fp16's subnormals)
        torch.testing.assert_close(_logits(ours, tokens[:, :16]), _logits(reference, tokens[:, :16]), rtol=1e-3, atol=1e-3)
    else:
        assert torch.equal(_logits(ours, tokens[:, :16]), _logits(reference, tokens[:, :16]))


EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
ATTENTION = "model.layers.1.self_attn.k_proj.weight"


def _damage(kind: str, checkpoint: dict, tiny_path, folder):
    """A damaged copy of the checkpoint, and the file and tensor its error must name."""
    from safetensors.torch import load_file, save_file

    index = "model.safetensors.index.json"
    if kind == "missing expert":
        path = _save_hub_layout({k: v for k, v in checkpoint.items() if k != EXPERT}, folder, tiny_path)
        return path, path / index, EXPERT
    if kind == "missing lm_head":  # Mixtral's config does not tie the head to the embeddings
        path = _save_hub_layout({k: v for k, v in checkpoint.items() if k != "lm_head.weight"}, folder, tiny_path)
        return path, path / index, "lm_head.weight"
    if kind == "missing from its shard":
        path = _save_hub_layout(checkpoint, folder, tiny_path)
        shard = path / json.loads((path / index).read_text())["weight_map"][ATTENTION]
        save_file({k: v for k, v in load_file(str(shard)).items() if k != ATTENTION}, str(shard), {"format": "pt"})
        return path, shard, ATTENTION
    if kind == "single file missing":
        path = _single_file({k: v for k, v in checkpoint.items() if k != ATTENTION}, tiny_path, folder)
        return path, path / "model.safetensors", ATTENTION
    if kind == "unexpected tensor":
        path = _save_hub_layout({**checkpoint, "model.layers.0.mlp.gate_proj.weight": torch.ones(4)}, folder, tiny_path)
        return path, sorted(path.glob("*.safetensors"))[-1], "model.layers.0.mlp.gate_proj.weight"
    if kind == "wrong shape":
        path = _save_hub_layout({**checkpoint, EXPERT: torch.ones(3, 3)}, folder, tiny_path)
        return path, path / json.loads((path / index).read_text())["weight_map"][EXPERT], EXPERT
    path = _save_hub_layout(checkpoint, folder, tiny_path)
    shard = sorted(path.glob("*.safetensors"))[2]
    if kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.unlink()
    return path, shard, None


@pytest.mark.parametrize("kind", ["missing expert", "missing lm_head", "missing from its shard", "single file missing",
                                  "unexpected tensor", "wrong shape", "truncated shard", "missing shard"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_tensor(tiny_path, checkpoint, tmp_path, kind):
    path, file, key = _damage(kind, checkpoint, tiny_path, tmp_path / "damaged")
    with pytest.raises(FinetuneError) as error:
        load_mixtral(path, quant="nf4", compute_dtype=torch.float32)
    message = str(error.value)
    assert message.startswith(f"{file}") and "\n" not in message, message
    assert key is None or f": {key}: " in message, message


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", None])
def test_a_folder_without_a_mixtral_config_is_refused(tiny_path, checkpoint, tmp_path, model_type):
    path = _save_hub_layout(checkpoint, tmp_path / "other", tiny_path, config_edit=lambda c: c.update(model_type=model_type))
    if model_type is None:  # transformers would fill in 8x7B's widths, and fail on the first tensor's shape
        (path / "config.json").unlink()
    with pytest.raises(FinetuneError, match="config.json: model_type is 'llama', not 'mixtral'" if model_type == "llama"
                       else "model_type is 'qwen2_moe'" if model_type else "no config.json"):
        load_mixtral(path)


HEADER_EDITS = {  # what a corrupted header can say that the file's size alone does not show
    # the first tensor moved onto the next one's bytes: the data's end is still where the header says
    "overlapping tensors": lambda h, a, b: h[a].update(
        data_offsets=[h[a]["data_offsets"][1], 2 * h[a]["data_offsets"][1] - h[a]["data_offsets"][0]]),
    "a shape against its bytes": lambda h, a, b: h[a].update(shape=[1]),
    "an unknown dtype": lambda h, a, b: h[a].update(dtype="F99"),
    "an offset that is not a count": lambda h, a, b: h[a].update(data_offsets=[float(n) for n in h[a]["data_offsets"]]),
    "a header nested too deeply": lambda h, a, b: b"[" * 100_000,
}


def _damage_file(kind: str, tiny_path, folder):
    """A copy of the checkpoint with one weight file damaged as an interrupted or corrupted download leaves it."""
    shutil.copytree(tiny_path, folder)
    files = sorted(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    shard = folder / (max(files, key=files.count) if kind in HEADER_EDITS else files[1])  # edits need two tensors
    data = shard.read_bytes()
    if kind == "truncated":
        shard.write_bytes(data[:-1000])
    elif kind == "header garbage":
        shard.write_bytes(data[:8] + b"\x00" * 64 + data[72:])
    elif kind == "header longer than the file":
        shard.write_bytes(data[:100])
    elif kind == "empty":
        shard.write_bytes(b"")
    elif kind == "bytes after the last tensor":
        shard.write_bytes(data + b"\x00" * 16)
    elif kind in HEADER_EDITS:  # the same tensor data behind an edited header (offsets count from the data's start)
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
        edited = HEADER_EDITS[kind](header, first, second)
        text = edited if isinstance(edited, bytes) else json.dumps(header).encode()
        shard.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    else:
        shard.unlink()
    return folder, shard


@pytest.mark.parametrize("kind", ["truncated", "header garbage", "header longer than the file", "empty",
                                  "bytes after the last tensor", "missing", *HEADER_EDITS])
def test_a_damaged_weight_file_is_found_from_its_header_naming_it(tiny_path, tmp_path, kind):
    """What load_mixtral would refuse after minutes of loading, check_weight_files refuses from the headers alone."""
    check_weight_files(tiny_path)  # an intact checkpoint passes
    path, shard = _damage_file(kind, tiny_path, tmp_path / "damaged")
    with pytest.raises(FinetuneError) as error:
        check_weight_files(path)
    message = str(error.value)
    assert message.startswith(f"{shard}: cannot be read (") and message.endswith("; download the checkpoint again")
    assert "\n" not in message, message
    if kind == "truncated":
        assert "truncated: tensor model." in message, message
    with pytest.raises(FinetuneError, match=rf"^{shard}: cannot be read \("):  # the loader agrees, in its own words
        load_mixtral(path, quant=None, compute_dtype=torch.float32)


def test_the_weight_check_reads_headers_not_tensor_data(tmp_path):
    """A 16 GiB weight file (sparse: it takes no disk) is checked in a moment, reading only its header."""
    n = 8 * 2**30
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}})
    header = header.encode() + b" " * (-len(header) % 8)
    (tmp_path / "config.json").write_text("{}")
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2 * n)
    io = Path("/proc/self/io")
    read_before = int(io.read_text().split()[1]) if io.exists() else 0  # rchar: bytes this process read
    started = time.perf_counter()
    check_weight_files(tmp_path)
    assert time.perf_counter() - started < 5  # reading 16 GiB takes minutes here
    if io.exists():
        assert int(io.read_text().split()[1]) - read_before < 2**20
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(8 + len(header) + 2 * n - 1)
    with pytest.raises(FinetuneError, match="truncated: tensor model.embed_tokens.weight ends at byte 17179869184"):
        check_weight_files(tmp_path)
