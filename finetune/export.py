"""Export a run for serving: merge the final adapter into the base checkpoint, streaming, then verify.

The merge reads the base checkpoint tensor by tensor, adds each targeted weight's LoRA delta
(scale * B @ A, computed in fp32), and writes shards as they fill, so it holds one shard plus one layer's
tensors at a time, never the model. The output keeps the original Mixtral checkpoint layout
(`model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight`).

Which base the adapter is merged into (`--base`):
- `original` (default): the base checkpoint's own weights. This is what serving stacks load, and it does
  not bake 4-bit rounding into the released model; the adapter was trained on the 4-bit weights, so the
  export differs from the trained function by the base's quantization error, as every QLoRA merge does.
- `dequantized`: the weights the adapter was trained against (the base quantized and dequantized with the
  run's settings). The export then computes exactly what was trained, at the price of 4-bit rounding in
  every quantized weight.

Every export is reloaded with stock transformers and checked before it is moved into place.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.errors import FinetuneError, is_disk_error
from finetune.model import DTYPES
from finetune.recipe.schema import MIXTRAL_TOKENIZER, SIZE

VERIFY_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 3 to 7."}],
    [{"role": "user", "content": "Écris une phrase en français, s'il te plaît."}],
]
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
QUANTIZED_KEY = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight$")
ADAPTER_PREFIX = "base_model.model."
EXPORT_MARKER = "finetune-export.json"  # written into every export: it tells an earlier export from a user's folder
SAFE_SUFFIXES = {".safetensors", ".json", ".jinja", ".md", ".txt", ".model"}


class ExportError(FinetuneError):
    """The export failed a check; the export folder was left as it was."""


@dataclass
class Adapter:
    """A saved adapter in the per-expert naming, read as plain tensors."""

    tensors: dict[str, torch.Tensor]
    config: dict

    @classmethod
    def read(cls, folder: Path) -> Adapter:
        from safetensors.torch import load_file

        tensors = load_file(folder / "adapter_model.safetensors")
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        return cls({k.removeprefix(ADAPTER_PREFIX): v for k, v in tensors.items()}, config)

    def scaling(self, module: str) -> float:
        from peft.utils.other import get_pattern_key

        r = self.config.get("rank_pattern", {}).get(get_pattern_key(self.config.get("rank_pattern", {}), module),
                                                     self.config["r"])
        alpha = self.config.get("alpha_pattern", {}).get(
            get_pattern_key(self.config.get("alpha_pattern", {}), module), self.config["lora_alpha"])
        return alpha / (r**0.5 if self.config.get("use_rslora") else r)

    def targets(self) -> set[str]:
        return {k.removesuffix(".lora_A.weight") + ".weight" for k in self.tensors if k.endswith(".lora_A.weight")}

    def delta(self, key: str) -> torch.Tensor | None:
        """scale * B @ A for a base weight, in fp32; None when the adapter does not target it."""
        module = key.removesuffix(".weight")
        a, b = self.tensors.get(f"{module}.lora_A.weight"), self.tensors.get(f"{module}.lora_B.weight")
        if a is None:
            return None
        return self.scaling(module) * (b.float() @ a.float())

    def replacement(self, key: str) -> torch.Tensor | None:
        """A weight the adapter trained in full (the router with `lora.router: full`)."""
        return self.tensors.get(key.replace(".block_sparse_moe.gate.", ".mlp.gate."))


@dataclass
class MergeReport:
    tensors: int = 0
    bytes_written: int = 0
    peak_bytes_held: int = 0
    unchanged_targets: list[str] = field(default_factory=list)
    held: int = 0

    def hold(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak_bytes_held = max(self.peak_bytes_held, self.held)


def base_tensors(base: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The base checkpoint's tensors one at a time, in the original layout (fused experts are split), with a
    progress bar over the checkpoint's tensors: reading, merging and writing happen at the pace of this stream."""
    from safetensors import safe_open
    from tqdm import tqdm

    index = base / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    keys = {}
    for shard in shards:  # the headers alone, for the bar's total
        with safe_open(str(base / shard), framework="pt", device="cpu") as f:
            keys[shard] = list(f.keys())
    with tqdm(total=sum(map(len, keys.values())), desc="[export] merging", unit="tensor") as progress:
        for shard in shards:
            with safe_open(str(base / shard), framework="pt", device="cpu") as f:
                for key in keys[shard]:
                    yield from _original_layout(key, f.get_tensor(key))
                    progress.update()


def _original_layout(key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", key):
        prefix = f"model.layers.{m[1]}.block_sparse_moe.experts"
        for e in range(tensor.shape[0]):
            if m[2] == "down_proj":
                yield f"{prefix}.{e}.w2.weight", tensor[e]
            else:
                w1, w3 = tensor[e].chunk(2)
                yield f"{prefix}.{e}.w1.weight", w1
                yield f"{prefix}.{e}.w3.weight", w3
    else:
        yield key.replace(".mlp.gate.", ".block_sparse_moe.gate."), tensor


def as_trained(tensors: Iterator[tuple[str, torch.Tensor]], num_experts: int, quant_type: str, double_quant: bool,
               compute_dtype: torch.dtype, report: MergeReport) -> Iterator[tuple[str, torch.Tensor]]:
    """The base weights the adapter saw in training: each quantized weight through the same 4-bit round trip
    as the loader (attention per matrix in the compute dtype, experts as one stack per layer in the
    checkpoint's dtype, so blocks and double-quant scales match)."""
    import bitsandbytes.functional as bnbf

    pending: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    for key, tensor in tensors:
        if m := EXPERT_KEY.match(key):
            layer = pending.setdefault(int(m[1]), {})
            layer[(int(m[2]), m[3])] = tensor
            report.hold(tensor.numel() * tensor.element_size())
            if len(layer) == 3 * num_experts:
                yield from _round_trip_layer(int(m[1]), pending.pop(int(m[1])), quant_type, double_quant, report)
        elif QUANTIZED_KEY.match(key):
            packed, state = bnbf.quantize_4bit(tensor.to(compute_dtype).contiguous(), blocksize=64,
                                               compress_statistics=double_quant,
                                               quant_type=quant_type)
            yield key, bnbf.dequantize_4bit(packed, state).float()  # NF4 levels * scale: not exact in bf16
        else:
            yield key, tensor
    if pending:
        raise ExportError(f"the base checkpoint lacks expert tensors of layers {sorted(pending)}")


def _round_trip_layer(layer: int, tensors: dict, quant_type: str, double_quant: bool, report: MergeReport):
    from finetune.moe.quantized_experts import Packed4bitStack

    experts = len(tensors) // 3
    gate_up = torch.stack([torch.cat([tensors[(e, "w1")], tensors[(e, "w3")]]) for e in range(experts)])
    down = torch.stack([tensors[(e, "w2")] for e in range(experts)])
    gate_up = Packed4bitStack(gate_up, quant_type, double_quant).dequantize(torch.float32)
    down = Packed4bitStack(down, quant_type, double_quant).dequantize(torch.float32)
    inter = down.shape[2]
    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
    for e in range(experts):
        yield f"{prefix}.{e}.w1.weight", gate_up[e, :inter]
        yield f"{prefix}.{e}.w3.weight", gate_up[e, inter:]
        yield f"{prefix}.{e}.w2.weight", down[e]
    report.held -= sum(t.numel() * t.element_size() for t in tensors.values())


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes`, each as soon as it is full."""

    def __init__(self, folder: Path, max_bytes: int, report: MergeReport):
        self.folder, self.max_bytes, self.report = folder, max_bytes, report
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.size += nbytes
        self.report.hold(nbytes)
        self.report.tensors += 1
        self.report.bytes_written += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.buffer, str(self.folder / f"shard-{len(self.shards)}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.report.held -= self.size
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        """Name the shards as transformers does and write the index when there are several."""
        if self.buffer:
            self.flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f"shard-{i}.tmp").rename(self.folder / name)
        if n > 1:
            index = {"metadata": {"total_size": self.report.bytes_written},
                     "weight_map": {key: names[i] for i, keys in enumerate(self.shards) for key in keys}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def merge(base: Path, adapter: Adapter, out: Path, dtype: torch.dtype, max_shard_bytes: int,
          trained_on: tuple[str, bool, torch.dtype] | None = None) -> MergeReport:
    """Stream base (+ adapter) into shards under `out`. trained_on=(quant_type, double_quant, compute_dtype)
    merges into the dequantized 4-bit weights instead of the original ones."""
    from transformers import AutoConfig

    report = MergeReport()
    tensors = base_tensors(base)
    if trained_on is not None:
        experts = AutoConfig.from_pretrained(base).num_local_experts
        tensors = as_trained(tensors, experts, *trained_on, report)
    writer = ShardWriter(out, max_shard_bytes, report)
    merged_targets = set()
    for key, tensor in tensors:
        replacement, delta = adapter.replacement(key), adapter.delta(key)
        if replacement is not None:
            result = replacement.to(dtype)
        elif delta is not None:
            merged_targets.add(key)
            result = (tensor.float() + delta).to(dtype)
            if torch.equal(result, tensor.to(dtype)):
                report.unchanged_targets.append(key)
        else:
            result = tensor.to(dtype)
        if not torch.isfinite(result).all():
            raise ExportError(f"{key}: NaN or inf after merging the adapter")
        writer.add(key, result)
    writer.close()
    if missing := sorted(adapter.targets() - merged_targets):
        raise ExportError(f"the adapter targets weights the base checkpoint lacks, e.g. {missing[:3]}")
    return report


def parse_size(text: str) -> int:
    m = re.fullmatch(SIZE, text.upper())
    if not m:
        raise ExportError(f"max shard size {text!r}: expected e.g. 5GB, 500MB")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])


# what run.json must record, and the file each entry's folder must hold (None: the entry is that file)
RUN_RECORD = {"recipe": None, "base_model": "config.json", "tokenizer": "tokenizer_config.json",
              "final_adapter": "adapter_model.safetensors"}


def run_record(run_dir: Path) -> dict[str, Path]:
    """run.json's entries as paths in `run_dir` itself. run.json records absolute paths, so a run that was moved
    or copied would otherwise read the files where it was written (or the original's): what lay under the run
    folder then is found under `run_dir` now; what lay outside it (a base checkpoint elsewhere) is kept."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise FinetuneError(f"{run_dir}: no run.json; is this a finished run folder?")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FinetuneError(f"{path}: not the JSON a run writes ({e})") from e
    missing = [key for key in RUN_RECORD if not isinstance(record, dict) or not isinstance(record.get(key), str)]
    if missing:
        raise FinetuneError(f"{path}: lacks {', '.join(missing)}; is the run finished? (a run writes run.json "
                            "when its last stage ends)")
    written_in = Path(record["recipe"]).parent  # where the run folder was: it holds recipe.yaml
    paths = {}
    for key, inside in RUN_RECORD.items():
        recorded = Path(record[key])
        if not recorded.is_absolute():
            recorded = run_dir / recorded
        elif written_in.is_absolute() and recorded.is_relative_to(written_in):
            recorded = run_dir / recorded.relative_to(written_in)
        needed = recorded / inside if inside else recorded
        if not needed.is_file():
            raise FinetuneError(f"{needed}: missing (the run's {key.replace('_', ' ')}, as {path} records it)")
        paths[key] = recorded
    return paths


@dataclass(frozen=True)
class RunFiles:
    """What an export needs from a finished run, as recorded in its run.json."""

    run_dir: Path
    base_model: Path
    adapter: Path
    tokenizer: Path
    recipe: dict

    @classmethod
    def read(cls, run_dir: Path) -> RunFiles:
        import yaml

        paths = run_record(run_dir)
        try:
            recipe = yaml.safe_load(paths["recipe"].read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise FinetuneError(f"{paths['recipe']}: not the recipe a run saves ({e})") from e
        if not isinstance(recipe, dict):
            raise FinetuneError(f"{paths['recipe']}: not the recipe a run saves (not a mapping)")
        return cls(run_dir, paths["base_model"], paths["final_adapter"], paths["tokenizer"], recipe)

    def export_settings(self, given: dict):
        """The export settings (an ExportSpec): each option given on the command line, else the run's own recipe
        setting (export.KEY), printed with where it came from."""
        from pydantic import ValidationError

        from finetune.recipe.schema import ExportSpec

        saved = self.recipe.get("export") or {}
        try:
            recipe = ExportSpec.model_validate(saved)
        except ValidationError as e:
            where = ", ".join(f"export.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise FinetuneError(f"{self.run_dir / 'recipe.yaml'}: {where}") from None
        chosen = {key: value for key, value in given.items() if value is not None}
        settings = recipe.model_copy(update=chosen)
        source = {key: "given" if key in chosen else f"the run's export.{key}" for key in given}
        print("[export] " + ", ".join(f"{key} {'by dtype' if (v := getattr(settings, key)) is None else v} "
                                      f"({source[key]})" for key in given))
        return settings

    def quantization(self) -> tuple[str, bool, torch.dtype] | None:
        quant = self.recipe["model"].get("quantization")
        return (quant["quant_type"], quant["double_quant"], DTYPES[self.recipe["model"]["compute_dtype"]]) \
            if quant else None


def default_tolerance(dtype: str, adapter_effect: float) -> float:
    """float32 keeps the merge exact up to summation order; in 16 bits every merged weight is rounded, which a
    small random model amplifies, so the export must instead stay much closer to base+adapter than the base
    is (it reproduces at least 65% of what the adapter changed, at the worst logit)."""
    return 1e-3 if dtype == "float32" else 0.35 * adapter_effect


def export_merged(run: RunFiles, out_dir: Path, dtype: str = "bfloat16", base: str = "original",
                  max_shard_size: str = "5GB", tolerance: float | None = None) -> dict:
    """Merge, write to a staging folder, verify, then replace out_dir. Returns the verification record."""
    from transformers import AutoConfig

    if base == "dequantized" and run.quantization() is None:
        raise ExportError("--base dequantized: this run trained on unquantized weights; use --base original")
    max_shard_bytes = parse_size(max_shard_size)
    _check_tolerance(tolerance)
    check_out_dir(run.run_dir, out_dir)
    with _staged(out_dir, "merged") as staging:
        print(f"[export] merging {run.adapter} into the {base} weights of {run.base_model} ({dtype})")
        report = merge(run.base_model, Adapter.read(run.adapter), staging, DTYPES[dtype], max_shard_bytes,
                       trained_on=run.quantization() if base == "dequantized" else None)
        if report.unchanged_targets:
            raise ExportError(f"{len(report.unchanged_targets)} targeted weights did not change when merged, e.g. "
                              f"{report.unchanged_targets[:3]} (an expert that never received tokens, or a delta "
                              f"below {dtype} resolution)")
        config = AutoConfig.from_pretrained(run.base_model)
        config.dtype = DTYPES[dtype]
        config.save_pretrained(staging)
        _add_legacy_config_keys(staging / "config.json")
        _generation_config(run.base_model).save_pretrained(staging)
        tokenizer = _serving_tokenizer(run.tokenizer)
        _save_serving_tokenizer(run, tokenizer, staging)
        (staging / "README.md").write_text(model_card(run, f"merged into the {base} base weights, {dtype}"))
        reference, effect = reference_logits(run, base, dtype, tokenizer)
        tolerance = default_tolerance(dtype, effect) if tolerance is None else tolerance
        record = verify_export(staging, tokenizer, reference, tolerance)
        record.update(adapter_effect=effect, base=base, dtype=dtype, merge_peak_bytes_held=report.peak_bytes_held,
                      bytes_written=report.bytes_written, tensors=report.tensors)
        (staging / "verification.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _replace(staging, out_dir)
    print(f"[export] verified: max |logit difference| {record['max_abs_logit_difference']:.3g} (tolerance "
          f"{record['tolerance']:.3g}); merge held at most {report.peak_bytes_held / 2**20:.1f} MiB of tensors")
    return record


def export_adapter(run: RunFiles, out_dir: Path, dtype: str = "bfloat16", tolerance: float | None = None) -> dict:
    """The final adapter alone, in the per-expert naming stock peft loads, its weights cast to dtype."""
    from safetensors.torch import load_file, save_file

    _check_tolerance(tolerance)
    check_out_dir(run.run_dir, out_dir)
    with _staged(out_dir, "adapter") as staging:
        tensors = load_file(run.adapter / "adapter_model.safetensors")
        save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()},
                  str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = json.loads((run.adapter / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = run.recipe["model"]["name_or_path"]
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer = _serving_tokenizer(run.tokenizer)
        _save_serving_tokenizer(run, tokenizer, staging)
        (staging / "README.md").write_text(model_card(run, f"LoRA adapter only, weights in {dtype}"))
        reference, effect = reference_logits(run, "original", "float32", tokenizer)
        exported = _logits(_stock_with_adapter(run.base_model, staging, torch.float32), _prompts(tokenizer))
        worst = max((a - b).abs().max().item() for a, b in zip(exported, reference))
        tolerance = default_tolerance(dtype, effect) if tolerance is None else tolerance
        if worst > tolerance:
            raise ExportError(f"{staging}: the {dtype} adapter moves logits by {worst:.3g} (> {tolerance})")
    record = {"max_abs_logit_difference": worst, "tolerance": tolerance, "dtype": dtype, "adapter_effect": effect}
    _replace(staging, out_dir)
    return record


def reference_logits(run: RunFiles, base: str, dtype: str, tokenizer) -> tuple[list[torch.Tensor], float]:
    """base+adapter, unmerged (stock transformers and peft on the original weights, or the model as trained:
    the 4-bit base with the adapter), and how far the adapter moves the logits from the base alone."""
    if base == "original":
        model = _stock_with_adapter(run.base_model, run.adapter, DTYPES[dtype])
    else:
        from finetune import model as models
        from finetune.recipe.schema import LoraSpec, ModelSpec

        # the base as this run folder holds it (a relative path in the saved recipe is read from where the run
        # was started, not from here)
        spec = ModelSpec.model_validate({**run.recipe["model"], "name_or_path": str(run.base_model),
                                         "tokenizer": str(run.tokenizer), "device": "cpu"})
        model = models.load_adapter(models.load_base(spec, run.base_model, "cpu")[0], run.adapter,
                                    LoraSpec.model_validate(run.recipe["lora"]), trainable=False)
    prompts = _prompts(tokenizer)
    tuned = _logits(model, prompts)
    with model.disable_adapter():
        plain = _logits(model, prompts)
    return tuned, max((a - b).abs().max().item() for a, b in zip(tuned, plain))


def verify_export(folder: Path, tokenizer, reference: list[torch.Tensor], tolerance: float) -> dict:
    """Reload with stock transformers alone and compare logits with base+adapter on fixed prompts."""
    from transformers import AutoModelForCausalLM

    unsafe = [p.name for p in folder.iterdir() if p.suffix not in SAFE_SUFFIXES]
    if unsafe:
        raise ExportError(f"{folder}: files that are not safetensors or text: {unsafe}")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # a truncated or corrupted shard surfaces here, in whatever type the loader raises
        raise ExportError(f"{folder}: the export does not load with stock transformers: {e}") from e
    exported = _logits(model, _prompts(tokenizer))
    if not all(torch.isfinite(x).all() for x in exported):
        raise ExportError(f"{folder}: the export produces NaN or inf logits")
    worst = max((a - b).abs().max().item() for a, b in zip(exported, reference))
    if worst > tolerance:
        raise ExportError(f"{folder}: logits differ from base+adapter by {worst:.3g} (> tolerance {tolerance})")
    return {"max_abs_logit_difference": worst, "tolerance": tolerance, "prompts": len(reference)}


def model_card(run: RunFiles, what: str) -> str:
    import yaml

    lines = [f"# Fine-tune of {run.recipe['model']['name_or_path']}", "", f"{what}.", "",
             f"Base checkpoint: `{run.recipe['model']['name_or_path']}`", "", "## Stages", ""]
    for stage in run.recipe["stages"]:
        kind = stage["type"]
        sources = [s.get("path") or s.get("hub") for s in (run.recipe["data"].get(kind) or {}).get("sources", [])]
        manifest_path = run.run_dir / kind / "manifest.json"
        final = json.loads(manifest_path.read_text())["final_eval"] if manifest_path.is_file() else {}
        metrics = {k: round(v, 4) for k, v in final.items() if isinstance(v, float) and "runtime" not in k}
        lines.append(f"- **{kind}** on {', '.join(map(str, sources))}; final evaluation: {metrics or 'none'}")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(run.recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _stock_with_adapter(base: Path, adapter: Path, dtype: torch.dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)


def _generation_config(base: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base)
    except OSError:
        return GenerationConfig(bos_token_id=1, eos_token_id=2)


def _prompts(tokenizer) -> list[torch.Tensor]:
    from finetune.data.chat import tokenize_prompt

    return [torch.tensor([tokenize_prompt(p, tokenizer)]) for p in VERIFY_PROMPTS]


@torch.no_grad()
def _logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=p).logits.float() for p in prompts]


def _check_tolerance(tolerance: float | None) -> None:
    if tolerance is not None and not (0 < tolerance < math.inf):
        raise ExportError(f"tolerance {tolerance}: must be a finite number > 0 (or none, for the default by dtype)")


def check_out_dir(run_dir: Path, out_dir: Path) -> None:
    """Refuse, before any work, an export folder whose replacement would delete what is not an earlier export:
    the run folder or a folder holding it, anything inside the run but its export folders, or a user's files.
    The export is staged in OUT.partial and the previous one set aside as OUT.old, so those are checked too."""
    if out_dir.name in ("", "..", "."):  # its .partial and .old siblings would land elsewhere
        raise ExportError(f"export folder {out_dir}: give the folder by its name, not as . or ..")
    run, out = run_dir.resolve(), out_dir.resolve()
    if out != run and out.is_relative_to(run) and out not in (run / "export", run / "export-adapter"):
        raise ExportError(f"export folder {out_dir}: inside the run folder {run_dir}, whose files it would "
                          f"replace; use the default ({run_dir / 'export'}) or a folder outside the run")
    for path in (out_dir, _sibling(out_dir, ".partial"), _sibling(out_dir, ".old")):
        role = "" if path == out_dir else f" (the export would be staged or set aside in {path})"
        if run.is_relative_to(path.resolve()):
            raise ExportError(f"export folder {out_dir}{role}: {'is' if path.resolve() == run else 'holds'} the "
                              f"run folder {run_dir}, which the export would delete; choose a folder outside the run")
        if path.exists() and not path.is_dir():
            raise ExportError(f"export folder {out_dir}{role}: {path} is a file, not an export folder")
        if path.is_dir() and any(path.iterdir()) and not _made_by_export(path):
            names = sorted(p.name for p in path.iterdir())
            raise ExportError(f"export folder {out_dir}{role}: {path} holds files that are not an earlier export "
                              f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}), which the export would "
                              "delete; choose a new or empty folder, or move them away")


def _made_by_export(folder: Path) -> bool:
    """The marker every export writes first, or the model card that exports wrote before there was one."""
    card = folder / "README.md"
    return (folder / EXPORT_MARKER).is_file() or (
        card.is_file() and card.read_text(encoding="utf-8", errors="replace").startswith("# Fine-tune of "))


def _sibling(out_dir: Path, suffix: str) -> Path:
    return out_dir.with_name(out_dir.name + suffix)


@contextmanager
def _staged(out_dir: Path, kind: str) -> Iterator[Path]:
    """OUT.partial, marked as an export, for the export to be written in; on any failure it is removed, and a
    file-system error (a full disk, a folder that cannot be written) becomes a one-line error naming the folder."""
    staging = _sibling(out_dir, ".partial")
    try:
        shutil.rmtree(staging, ignore_errors=True)  # a killed export's, as check_out_dir made sure
        staging.mkdir(parents=True)
        (staging / EXPORT_MARKER).write_text(json.dumps({"made_by": "finetune export", "kind": kind}) + "\n",
                                             encoding="utf-8")
        yield staging
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(e, FinetuneError) and is_disk_error(e):  # not a missing input file, say
            raise ExportError(f"export folder {out_dir}: {e}; nothing was replaced") from e
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _serving_tokenizer(folder: Path):
    """The run's tokenizer, padding on the left as Mixtral's own does: batched generation needs it (training
    padded on the right)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, padding_side="left")


def _save_serving_tokenizer(run: RunFiles, tokenizer, folder: Path) -> None:
    """The tokenizer as Mixtral's own folder holds it, for transformers 4.x and tools that read the SentencePiece
    file (llama.cpp's converter, TGI): the chat template inside tokenizer_config.json (4.x before 4.51 does not
    read chat_template.jinja), a class name 4.x knows, and tokenizer.model."""
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        # transformers 5's name for what 4.x calls PreTrainedTokenizerFast (5 keeps that name as an alias): both
        # load tokenizer.json as it is. Not LlamaTokenizerFast: 5 rebuilds that class's pipeline (a Metaspace
        # pre-tokenizer, no normalizer), which changes the ids of text that starts with a space.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _legacy_merges(folder / "tokenizer.json")
    source = sentencepiece_model(run)
    if source is None:
        print(f"[export] no tokenizer.model: {run.tokenizer} holds none and the tokenizer is not {MIXTRAL_TOKENIZER}")
        return
    _check_same_vocabulary(source, tokenizer, run.tokenizer)
    shutil.copyfile(source, folder / "tokenizer.model")


def _legacy_merges(path: Path) -> None:
    """BPE merges as "left right" strings, the form tokenizers before 0.20 (which transformers 4.44 and 4.45 pin)
    reads, rather than pairs; the same merges when no piece holds a space, as in SentencePiece vocabularies."""
    backend = json.loads(path.read_text(encoding="utf-8"))
    merges = backend["model"].get("merges") or []
    if all(isinstance(m, list) and " " not in "".join(m) for m in merges) and merges:
        backend["model"]["merges"] = [" ".join(m) for m in merges]
        path.write_text(json.dumps(backend, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def sentencepiece_model(run: RunFiles) -> Path | None:
    """The run's tokenizer.model, else mistral-common's Mixtral model when the run used our rebuild of it
    (transformers 5 does not save tokenizer.model with a tokenizer, so the run's folder rarely holds one)."""
    if (run.tokenizer / "tokenizer.model").is_file():
        return run.tokenizer / "tokenizer.model"
    if run.recipe["model"]["tokenizer"] == MIXTRAL_TOKENIZER:
        from finetune.tokenizer import mixtral_tokenizer_file

        return mixtral_tokenizer_file()
    return None


def _check_same_vocabulary(model_file: Path, tokenizer, tokenizer_folder: Path) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    ours = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    if pieces != ours:
        first = next((i for i, (a, b) in enumerate(zip(pieces, ours)) if a != b), min(len(pieces), len(ours)))
        raise ExportError(f"{model_file}: not the vocabulary of the run's tokenizer {tokenizer_folder} ({len(pieces)} "
                          f"pieces against {len(ours)}; first difference at id {first})")


def _add_legacy_config_keys(path: Path) -> None:
    """The keys transformers 4.x reads where 5 writes others: rope_theta (5 keeps it in rope_parameters; readers
    built on 4.x, llama.cpp's converter among them, fall back to their own default theta without it), rope_scaling
    for a rope other than the default, and torch_dtype (4.x before 4.56). transformers 5 reads them as the same."""
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace(staging: Path, out_dir: Path) -> None:
    """Swap the verified export in; a previous export stays whole until then."""
    old = _sibling(out_dir, ".old")
    shutil.rmtree(old, ignore_errors=True)  # an export killed while swapping left it (check_out_dir made sure)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
