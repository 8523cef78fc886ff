"""The recipe schema: every key a recipe may hold, its type and its default.

Defaults live here and nowhere else. Rules that tie fields together live here too, so a bad
recipe fails before anything heavy is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator

TINY_MIXTRAL = "tiny-mixtral"
MIXTRAL_TOKENIZER = "mixtral-v1"


class Section(BaseModel):
    """A recipe section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Quantization(Section):
    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class ModelSpec(Section):
    name_or_path: str = Field(
        description=f"A local checkpoint folder, a hub id, or '{TINY_MIXTRAL}' for the embedded tiny model."
    )
    tokenizer: str = Field(
        MIXTRAL_TOKENIZER,
        description=f"'{MIXTRAL_TOKENIZER}': Mixtral-8x7B's SentencePiece model as shipped by mistral-common.",
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quantization: Quantization | None = Field(default_factory=Quantization)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class LoraSpec(Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    attention: bool = Field(True, description="LoRA on q_proj, k_proj, v_proj, o_proj.")
    experts: bool = Field(True, description="LoRA on every expert's w1, w2, w3, separate A/B per expert.")
    router: Literal["frozen", "full"] = "frozen"
    experts_r: PositiveInt | None = Field(None, description="Rank for the expert adapters; defaults to r.")
    experts_alpha: PositiveInt | None = Field(None, description="Alpha for the expert adapters; defaults to alpha.")
    experts_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="Dropout for the expert adapters; defaults to dropout."
    )

    @model_validator(mode="after")
    def _targets_something(self) -> LoraSpec:
        if not (self.attention or self.experts):
            raise ValueError("LoRA targets nothing: enable attention or experts")
        return self


class DataSource(Section):
    path: str | None = Field(None, description="A local JSON Lines file (relative to the working directory).")
    hub: str | None = Field(None, description="A dataset on the Hugging Face hub, read with datasets.load_dataset.")
    split: str = "train"
    weight: Annotated[float, Field(gt=0)] = 1.0

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'hub' (a hub dataset name)")
        return self

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"no such file: {path} (relative paths are read from {Path.cwd()})")
        return path


class StageData(Section):
    sources: list[DataSource] = Field(min_length=1)
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class DataSpec(Section):
    max_seq_len: PositiveInt = 2048
    train_on_prompt: bool = False
    sft: StageData | None = None
    dpo: StageData | None = None


class Training(Section):
    """Settings shared by every stage; each stage has its own values."""

    learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.03
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: PositiveInt | None = Field(None, description="Overrides epochs when set.")
    batch_size: PositiveInt = 1
    grad_accum: PositiveInt = 1
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    gradient_checkpointing: bool = True
    logging_steps: PositiveInt = 10
    save_steps: PositiveInt = 200
    eval_steps: PositiveInt | None = None
    router_aux_loss_coef: Annotated[float, Field(ge=0.0)] = 0.02


class SFTStage(Training):
    type: Literal["sft"]


class DPOStage(Training):
    type: Literal["dpo"]
    learning_rate: Annotated[float, Field(gt=0)] = 5e-6
    beta: Annotated[float, Field(gt=0)] = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down"] = "sigmoid"


Stage = Annotated[SFTStage | DPOStage, Field(discriminator="type")]
STAGE_TYPES = ("sft", "dpo")


class ExportSpec(Section):
    merge: bool = Field(True, description="Merge the final adapter into the base weights and save the merged model.")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    verify_tolerance: Annotated[float, Field(gt=0)] = Field(
        2e-2, description="Largest allowed |logit difference| between the export and base+adapter."
    )


class TrackingSpec(Section):
    report_to: list[Literal["none", "wandb", "tensorboard"]] = Field(default_factory=lambda: ["none"])
    project: str = "finetune"
    run_name: str | None = None


class Recipe(Section):
    seed: int = 42
    output_dir: str = Field(description="The run directory; relative paths are taken from the working directory.")
    model: ModelSpec
    lora: LoraSpec | None = Field(default_factory=LoraSpec)
    data: DataSpec
    stages: list[Stage] = Field(min_length=1)
    export: ExportSpec = Field(default_factory=ExportSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("lora")
    @classmethod
    def _quantized_needs_lora(cls, lora: LoraSpec | None, info: ValidationInfo) -> LoraSpec | None:
        model = info.data.get("model")
        if lora is None and model is not None and model.quantization is not None:
            raise ValueError("required when model.quantization is set: 4-bit weights cannot be trained directly")
        return lora

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: list[SFTStage | DPOStage], info: ValidationInfo) -> list[SFTStage | DPOStage]:
        kinds = [s.type for s in stages]
        data = info.data.get("data")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each stage type may appear once, got {kinds}")
        if "dpo" in kinds and "sft" in kinds and kinds.index("dpo") < kinds.index("sft"):
            raise ValueError("dpo continues from the sft adapter, so sft must come first")
        for kind in kinds:
            if data is not None and getattr(data, kind) is None:
                raise ValueError(f"a '{kind}' stage needs data.{kind}")
        return stages

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)
