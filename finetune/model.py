"""The model side of a run: where the base comes from, how it is loaded for training, and its adapters."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from finetune.errors import FinetuneError, one_line
from finetune.recipe.schema import TINY_MIXTRAL, LoraSpec, ModelSpec, Training

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(spec: ModelSpec) -> str:
    """Where this process puts its model: the CPU, or its own GPU (cuda:LOCAL_RANK) when a launcher started several."""
    from finetune.distributed import local_rank

    if spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but torch sees no CUDA device; set model.device: cpu or auto")
    return f"cuda:{local_rank()}"


def prepare_base(spec: ModelSpec, run_dir: Path, seed: int) -> Path:
    """The base checkpoint folder: the recipe's path, or the embedded tiny Mixtral built once into the run.
    A checkpoint that is not a Mixtral, or whose weight files are missing or damaged, is refused here, before any
    stage starts."""
    from finetune.moe.loader import check_weight_files, mixtral_config

    if spec.name_or_path != TINY_MIXTRAL:
        path = Path(spec.name_or_path) if Path(spec.name_or_path).exists() else _download(spec.name_or_path)
        with _naming_the_base(spec):
            mixtral_config(path)
            check_weight_files(path)
        return path
    from finetune.moe.tiny import build_tiny_mixtral

    path = run_dir / "base-model"
    if not (path / "config.json").is_file():
        build_tiny_mixtral(path, seed=seed)
    return path


def _download(repo_id: str) -> Path:
    """The hub checkpoint's folder in the Hugging Face cache, downloaded if it is not there yet: its json files
    (config, tokenizer, shard index) first, then only the weight files the index names. Mistral's repos hold the
    same weights twice (the transformers shards and their own consolidated*.safetensors): all of `*.safetensors`
    would double 8x7B's ~90 GB."""
    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download

    from finetune.moe.loader import weight_files

    try:
        # snapshot_download asks the hub for the commit with no time limit, so it waits forever on a network that
        # stalls the connection: this same small question first, with the hub's own metadata timeout
        # (HF_HUB_ETAG_TIMEOUT, 10 s without a byte; the file downloads keep theirs), decides online or cache only
        # and names the commit, which both downloads then fetch without asking again (and from the same commit)
        revision, unreachable = HfApi().repo_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha, None
    except (OSError, httpx2.TransportError) as e:  # offline, no network, unknown or gated repo, hub down
        revision, unreachable = None, e
    try:
        metadata = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json"],
                                          local_files_only=unreachable is not None))
        return Path(snapshot_download(repo_id, revision=metadata.name, allow_patterns=weight_files(metadata),
                                      local_files_only=unreachable is not None))
    except (OSError, httpx2.TransportError) as e:  # not in the cache, or a download that failed
        cause = unreachable or e
        cached = getattr(e, "snapshot_path", None) if unreachable else None  # an IncompleteSnapshotError's
        incomplete = f"; the cached copy in {cached} lacks some of its files" if cached else ""
        raise FinetuneError(
            f"model.name_or_path: {repo_id!r} is not a local folder, and getting it from the Hugging Face hub failed "
            f"({type(cause).__name__}: {one_line(cause)}{incomplete}); download it first (hf download {repo_id} "
            "--include '*.json' 'model*.safetensors') or set model.name_or_path to a local checkpoint folder") from None


@contextmanager
def _naming_the_base(spec: ModelSpec):
    """A problem with the checkpoint's files, prefixed with the recipe key that chose it."""
    try:
        yield
    except FinetuneError as e:
        raise FinetuneError(f"model.name_or_path {spec.name_or_path!r}: {e}") from None


def load_base(spec: ModelSpec, base_path: Path, device: str):
    """The frozen base for training: 4-bit with the experts quantized too, or plain weights without quantization."""
    from finetune.moe import load_mixtral

    quant = spec.quantization
    with _naming_the_base(spec):
        model, report = load_mixtral(
            base_path,
            quant=quant.quant_type if quant else None,
            double_quant=quant.double_quant if quant else False,
            compute_dtype=DTYPES[spec.compute_dtype],
            device=device,
        )
    model.name_or_path = str(base_path)  # peft records it as the adapter's base_model_name_or_path
    return model, report.format()


def lora_config(spec: LoraSpec):
    from finetune.moe import build_lora_config

    return build_lora_config(
        r=spec.r, alpha=spec.alpha, dropout=spec.dropout, attention=spec.attention, experts=spec.experts,
        router=spec.router, expert_r=spec.experts_r, expert_alpha=spec.experts_alpha,
    )


def attach_new_adapter(base, spec: LoraSpec):
    from peft import get_peft_model

    base.enable_input_require_grads()
    return _with_recipe_dropout(get_peft_model(base, lora_config(spec)), spec)


def load_adapter(base, adapter_dir: Path, spec: LoraSpec, trainable: bool):
    """A saved adapter (per-expert naming) onto the 4-bit base, as the adapter "default"."""
    from finetune.moe import load_adapter as load_expert_adapter

    base.enable_input_require_grads()
    return _with_recipe_dropout(load_expert_adapter(base, adapter_dir, is_trainable=trainable), spec)


def _with_recipe_dropout(model, spec: LoraSpec):
    from finetune.moe import set_expert_dropout

    if spec.experts and spec.experts_dropout is not None:
        set_expert_dropout(model, spec.experts_dropout)
    return model


def apply_stage_memory_settings(model, stage: Training, device: str) -> None:
    """A stage's memory settings on the model it trains: the expert kernel's dequantization pieces
    (`expert_chunks`) and, with `offload_activations`, the checkpointed layer inputs in host memory."""
    from finetune import distributed
    from finetune.moe.grouped import DEFAULT_CHUNKS, chunk_count
    from finetune.moe.quantized_experts import QuantizedExperts, set_expert_chunks

    log = print if distributed.is_main() else lambda line: None
    if set_expert_chunks(model, stage.expert_chunks):
        experts = next(m for m in model.modules() if isinstance(m, QuantizedExperts))
        pieces = chunk_count(experts, stage.expert_chunks or DEFAULT_CHUNKS)
        asked = "default" if stage.expert_chunks is None else f"asked {stage.expert_chunks}"
        log(f"[model] the grouped expert kernel dequantizes each 4-bit expert stack in {pieces} pieces ({asked})")
    if stage.offload_activations:
        from finetune.offload import offload_during_forward

        offload_during_forward(model.get_base_model().model, torch.device(device).type, log=log)


def trainable_summary(model) -> str:
    from finetune.moe import trainable_report

    return trainable_report(model).format()


def save_adapter(model, adapter_dir: Path, write: bool = True) -> None:
    """The "default" adapter in the original per-expert naming, loadable by stock peft on a stock Mixtral.
    A sharded model is gathered by every process; the one with `write` writes it."""
    from finetune.moe import save_adapter as save_expert_adapter

    save_expert_adapter(model, adapter_dir, adapter_name="default", write=write)


@contextmanager
def fp32_adapter_weights(model):
    """Build a trl trainer inside this: trl casts the trainable weights of a 4-bit model to bf16 (after the QLoRA
    paper). We keep fp32 master weights instead, so optimizer updates below bf16's resolution are not lost,
    DPO's reference copy equals the policy exactly, and a resumed run (peft reloads adapters in fp32) computes
    exactly what an uninterrupted one does. Compute still runs in the compute dtype."""
    base = model.get_base_model()
    quantized = getattr(base, "is_loaded_in_4bit", False)
    base.is_loaded_in_4bit = False  # what trl reads to decide the cast
    try:
        yield
    finally:
        base.is_loaded_in_4bit = quantized
