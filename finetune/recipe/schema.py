"""The recipe schema: every key a recipe may hold, its type and its default.

Defaults live here and nowhere else. Rules that tie fields together live here too, so a bad
recipe fails before anything heavy is imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

TINY_MIXTRAL = "tiny-mixtral"
MIXTRAL_TOKENIZER = "mixtral-v1"
# what marks a model or tokenizer as a local folder rather than a hub id (org/name)
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")
SIZE = r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*"  # a byte count such as 5GB or 500mb (export.max_shard_size)


class Section(BaseModel):
    """A recipe section: unknown keys are errors, never silently ignored.

    Numbers must be finite: YAML reads .inf and .nan as floats, and no setting means either.
    Booleans (StrictBool) take only true/false, so a quoted "no" or "off" is an error, not a guess.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Quantization(Section):
    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: StrictBool = True


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

    @field_validator("name_or_path", "tokenizer")
    @classmethod
    def _local_folder_exists(cls, value: str) -> str:
        """A local-looking path that is missing would otherwise be tried as a hub id, after the run folder exists."""
        if not value.startswith(LOCAL_PATH_PREFIXES) and value not in (".", ".."):
            return value
        folder = Path(value).expanduser()  # expanded here: the loaders take the path as it is
        if not folder.is_dir():
            what = "not a folder" if folder.exists() else "no such folder"
            if value.startswith("~"):
                what += f": {value} ({folder})"
            else:
                what += f": {value}" + ("" if folder.is_absolute() else f" (relative paths are read from {Path.cwd()})")
            raise ValueError(what)
        return str(folder) if value.startswith("~") else value


class LoraSpec(Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    attention: StrictBool = Field(True, description="LoRA on q_proj, k_proj, v_proj, o_proj.")
    experts: StrictBool = Field(True, description="LoRA on every expert's w1, w2, w3, separate A/B per expert.")
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


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SFT_FORMATS = ("messages", "prompt_completion", "instruction")
ROW_FORMATS = (*SFT_FORMATS, "preference")
# The fields each row format reads; `columns` renames them. "system" is an optional system prompt column.
FORMAT_FIELDS = {
    "messages": ("messages", "system"),
    "prompt_completion": ("prompt", "completion", "system"),
    "instruction": ("instruction", "input", "output", "system"),
    "preference": ("prompt", "chosen", "rejected", "system"),
}
RowFormat = Literal["messages", "prompt_completion", "instruction", "preference"]
FieldName = Literal[
    "messages", "prompt", "completion", "instruction", "input", "output", "system", "chosen", "rejected"
]
SPLIT = re.compile(r"(?P<name>[\w.-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?")


class DataSource(Section):
    path: str | None = Field(
        None, description="A local file, relative to the working directory: JSON Lines (.jsonl), JSON (.json, a list "
        "of rows), Parquet (.parquet) or CSV (.csv; list fields such as messages as JSON text)."
    )
    hub: str | None = Field(
        None, description="A dataset on the Hugging Face hub, or anything else datasets.load_dataset reads (such as "
        "a local dataset folder)."
    )
    subset: str | None = Field(None, description="The hub dataset's configuration (subset) name, when it has several.")
    split: str = Field(
        "train", description="The split to read, optionally sliced: 'train_sft', 'train[:1000]', 'train[10%:]'. "
        "A local file has one split, 'train'."
    )
    format: Literal["auto", RowFormat] = Field(
        "auto", description="The row format: 'messages' (chat), 'prompt_completion', 'instruction' "
        "(instruction/input/output) or 'preference' (prompt/chosen/rejected); 'auto' tells it from the columns."
    )
    columns: dict[FieldName, Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict, description="Fields stored under other column names, {field: column}, e.g. "
        "{messages: conversation} or {instruction: question, output: answer}."
    )
    weight: Annotated[float, Field(gt=0)] = Field(
        1.0, description="Share of the source's usable rows in the mixture: 0.5 takes a seeded half, 2.0 every row "
        "twice, 1.5 every row once and a seeded half again."
    )
    rows: PositiveInt | None = Field(
        None, description="Take exactly this many training rows from the source instead of a weight (seeded; rows "
        "repeat when the source has fewer)."
    )
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="Fraction of this source's usable rows held out for evaluation; the stage's eval_fraction "
        "when not set."
    )

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'hub' (a hub dataset name)")
        if self.path is not None and self.subset is not None:
            raise ValueError("subset: only a hub dataset has subsets; a local file has none")
        if self.path is not None and SPLIT.fullmatch(self.split)["name"] != "train":
            raise ValueError(
                f"split: a local file has one split, 'train' (sliceable: 'train[:100]'), not {self.split!r}"
            )
        if self.rows is not None and "weight" in self.model_fields_set:
            raise ValueError("give either 'weight' (a share of the source) or 'rows' (a number of rows), not both")
        allowed = FORMAT_FIELDS.get(self.format, tuple(sorted({f for fs in FORMAT_FIELDS.values() for f in fs})))
        stray = [f for f in self.columns if f not in allowed]
        if stray:
            raise ValueError(f"columns: format '{self.format}' has no field {', '.join(map(repr, stray))}; "
                             f"its fields are {', '.join(allowed)}")
        return self

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path is None:
            return path
        if not path.endswith(FILE_SUFFIXES):
            raise ValueError(f"cannot tell the file type of {path}: expected one of {', '.join(FILE_SUFFIXES)}")
        if Path(path).is_dir():
            raise ValueError(f"{path} is a folder, not a data file")
        if not Path(path).is_file():
            raise ValueError(f"no such file: {path} (relative paths are read from {Path.cwd()})")
        return path

    @field_validator("split")
    @classmethod
    def _split_syntax(cls, split: str) -> str:
        if not SPLIT.fullmatch(split):
            raise ValueError(f"not a split: {split!r}; expected a name, optionally sliced: 'train', 'train[:1000]', "
                             "'train[10%:50%]'")
        return split

    @property
    def name(self) -> str:
        """How reports name the source: the file, or the hub dataset with its subset and split."""
        if self.path is not None:
            return self.path
        return f"{self.hub}{f'/{self.subset}' if self.subset else ''}[{self.split}]"


class StageData(Section):
    sources: list[DataSource] = Field(min_length=1, description="The stage's data sources, mixed by their weights.")
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="Fraction of each source's usable rows held out for evaluation (at least one row when not "
        "zero), for sources that set none."
    )


class SFTData(StageData):
    packing: StrictBool = Field(
        False, description="Pack several examples into each max_seq_len sequence (best-fit decreasing); positions "
        "and attention restart at every example."
    )

    @field_validator("sources")
    @classmethod
    def _chat_formats(cls, sources: list[DataSource]) -> list[DataSource]:
        for index, source in enumerate(sources):
            if source.format == "preference":
                raise ValueError(f"source {index} ({source.name}): an sft stage reads {', '.join(SFT_FORMATS)} rows, "
                                 "not preference rows")
        return sources


class DPOData(StageData):
    @field_validator("sources")
    @classmethod
    def _preference_format(cls, sources: list[DataSource]) -> list[DataSource]:
        for index, source in enumerate(sources):
            if source.format not in ("auto", "preference"):
                raise ValueError(f"source {index} ({source.name}): a dpo stage reads preference rows "
                                 f"(prompt, chosen, rejected), not '{source.format}'")
        return sources


class DataSpec(Section):
    max_seq_len: PositiveInt = Field(
        2048, description="Longest example in tokens; for DPO, the prompt plus the longer of the two replies."
    )
    on_too_long: Literal["drop", "truncate", "fail"] = Field(
        "drop", description="An example longer than max_seq_len: 'drop' it, 'truncate' it to its first max_seq_len "
        "tokens (one left with no trained token is dropped), or 'fail'. Drops and truncations are counted."
    )
    on_bad_row: Literal["fail", "drop"] = Field(
        "fail", description="A row that cannot be used (a missing field, an unknown role, wrong turn order, an empty "
        "message, invalid UTF-8 or JSON...): 'fail' stops naming file, row and reason; 'drop' skips it, counted by "
        "reason."
    )
    train_on_prompt: StrictBool = Field(False, description="SFT: put the loss on system and user tokens too.")
    num_proc: PositiveInt | None = Field(
        None, description="Processes that tokenize; null: one per 20,000 rows, up to the CPU cores available."
    )
    cache: StrictBool = Field(
        True, description="Reuse preprocessed data from $FINETUNE_CACHE (default ~/.cache/finetune), keyed by this "
        "section, the seed, the tokenizer and the files' contents."
    )
    sft: SFTData | None = Field(None, description="The SFT stage's data: chat, prompt/completion or instruction rows.")
    dpo: DPOData | None = Field(None, description="The DPO stage's data: preference rows.")


# Warmup rises from learning rate 0, so a stage of one optimizer step with any warmup takes that step at rate 0.
ONE_STEP_AT_RATE_ZERO = (
    "{steps}, and with warmup_ratio {ratio} that one step trains at learning rate 0 (warmup starts from 0): the "
    "adapters would not change. Set warmup_ratio: 0 or lr_scheduler: constant for this stage, or train more steps"
)


def zero_rate_warmup(warmup_ratio: float | None, lr_scheduler: str | None) -> bool:
    """Whether a one-step stage with these settings takes its step at learning rate 0 ("constant" has no warmup)."""
    return bool(warmup_ratio) and lr_scheduler not in (None, "constant")


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
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw: torch's AdamW, float32 moments (8 bytes per trainable weight: 1.8 GiB for "
                             "Mixtral-8x7B's LoRA at r 16); adamw_8bit: bitsandbytes' blockwise 8-bit AdamW (about "
                             "2 bytes per weight, 0.45 GiB), one process or DDP."
    )
    gradient_checkpointing: StrictBool = True
    offload_activations: StrictBool = Field(
        False, description="With gradient_checkpointing: each decoder layer's checkpointed input waits for the "
                           "backward in host memory (pinned, copied on a side stream): tokens x hidden x 2 bytes "
                           "less GPU memory per layer but the first (about 1 GiB for Mixtral-8x7B at 4k tokens), the same "
                           "computation."
    )
    expert_chunks: PositiveInt | None = Field(
        None, description="Pieces the grouped expert kernel dequantizes each layer's 4-bit expert stacks in, along the "
                          "intermediate dimension (one piece of dense weights exists at a time): more pieces, less GPU "
                          "memory and a little less speed. Rounded down to a count that cuts whole 4-bit blocks; null: "
                          "finetune.moe.grouped.DEFAULT_CHUNKS (2)."
    )
    logging_steps: PositiveInt = 10
    save_steps: PositiveInt = 200
    save_total_limit: PositiveInt | None = Field(
        3, description="Checkpoints kept per stage (the newest complete ones); null keeps all."
    )
    eval_steps: PositiveInt | None = None
    router_aux_loss_coef: Annotated[float, Field(ge=0.0)] = 0.02

    @field_validator("max_steps")
    @classmethod
    def _one_step_needs_no_warmup(cls, max_steps: int | None, info: ValidationInfo) -> int | None:
        if max_steps == 1 and zero_rate_warmup(info.data.get("warmup_ratio"), info.data.get("lr_scheduler")):
            raise ValueError(ONE_STEP_AT_RATE_ZERO.format(steps="max_steps is 1", ratio=info.data["warmup_ratio"]))
        return max_steps

    @field_validator("offload_activations")
    @classmethod
    def _offload_needs_checkpointing(cls, offload: bool, info: ValidationInfo) -> bool:
        if offload and not info.data.get("gradient_checkpointing", True):
            raise ValueError("needs gradient_checkpointing: true (what is offloaded is the checkpoints' layer inputs; "
                             "without checkpointing every saved activation would cross PCIe)")
        return offload


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
    merge: StrictBool = Field(
        True, description="Merge the final adapter into the base weights and save the merged model."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    base: Literal["original", "dequantized"] = Field(
        "original", description="Merge into the base checkpoint's weights, or into the 4-bit weights as trained."
    )
    max_shard_size: str = Field("5GB", pattern=f"(?i)^{SIZE}$", description="e.g. 5GB, 500MB")
    verify_tolerance: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Largest allowed |logit difference| between the export and base+adapter; default: "
                          "1e-3 in float32, and in 16 bits 0.35 x the largest logit change the adapter makes (the "
                          "export must keep at least 65% of it)."
    )


# what each dashboard imports, and how to install it; wandb and tensorboard are dependencies, the others extras
DASHBOARD_PACKAGES = {
    "wandb": (("wandb",), "pip install wandb"),
    "tensorboard": (("tensorboard",), "pip install tensorboard"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install mlflow-skinny sqlalchemy alembic (the extra "
               "finetune[mlflow]: pip install -e '.[mlflow]' in a checkout)"),
    "trackio": (("trackio",), "pip install trackio (the extra finetune[trackio]: pip install -e '.[trackio]' in a "
                "checkout)"),
}


Dashboard = Literal[("none", *DASHBOARD_PACKAGES)]


def dashboard_installed(name: str) -> bool:
    return _installed(DASHBOARD_PACKAGES[name][0])


def _installed(modules: tuple[str, ...]) -> bool:
    from importlib.util import find_spec

    return all(find_spec(module) is not None for module in modules)


def _default_dashboards() -> list[str]:
    """wandb when it is installed (it is a dependency, so normally always), otherwise none."""
    return ["wandb"] if dashboard_installed("wandb") else ["none"]


class TrackingSpec(Section):
    report_to: list[Dashboard] = Field(
        default_factory=_default_dashboards, min_length=1,
        description="Dashboards to log to, several at once: 'wandb' (offline, synced later, when no W&B credentials "
        "are found), 'tensorboard' (event files in <output_dir>/tensorboard), 'mlflow' (MLFLOW_TRACKING_URI, or a "
        "local store in <output_dir>/mlflow.db), 'trackio' (its local store, or the Space or server it is set up "
        "for), or 'none'."
    )
    project: str = Field("finetune", description="The W&B or trackio project, the mlflow experiment.")
    run_name: str | None = Field(None, description="The dashboard run's name; the output_dir's folder name when null.")
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, description="W&B and mlflow tags (trackio has none; they are in its config)."
    )
    notes: str | None = Field(None, description="W&B notes, the mlflow run's description: a line about what this run "
                                 "tries.")
    router_stats: StrictBool = Field(
        True, description="Log the router's per-layer expert load, entropy and auxiliary loss while training."
    )
    router_stats_steps: PositiveInt | None = Field(
        None, description="Steps between router statistics; the stage's logging_steps when null."
    )
    drift_examples: Annotated[int, Field(ge=0)] = Field(
        16, description="Held-out examples on which each stage's end compares its routing with the base model's "
        "(0: no drift measurement)."
    )

    @field_validator("report_to")
    @classmethod
    def _usable_dashboards(cls, report_to: list[str]) -> list[str]:
        if "none" in report_to and len(report_to) > 1:
            raise ValueError(f"'none' cannot be combined with dashboards, got {report_to}")
        if len(set(report_to)) != len(report_to):
            raise ValueError(f"a dashboard is listed twice: {report_to}")
        missing = [d for d in report_to if d != "none" and not dashboard_installed(d)]
        if missing:
            raise ValueError("; ".join(f"'{d}' is not installed: {DASHBOARD_PACKAGES[d][1]}" for d in missing))
        return report_to


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

    @field_validator("output_dir")
    @classmethod
    def _a_folder_of_its_own(cls, output_dir: str) -> str:
        """--overwrite deletes output_dir, so it must never be a folder that holds anything else of the user's."""
        if not output_dir.strip():
            raise ValueError("is empty (that would be the working directory): give a folder for this run, "
                             "such as runs/my-run")
        folder = Path(output_dir).expanduser()
        resolved, cwd = folder.resolve(), Path.cwd().resolve()
        if resolved == Path(resolved.anchor):
            what = "the filesystem root"
        elif resolved == Path.home().resolve():
            what = "your home folder"
        elif resolved == cwd:
            what = "the working directory"
        elif resolved in cwd.parents:
            what = "a folder above the working directory"
        else:
            return str(folder) if output_dir.startswith("~") else output_dir
        raise ValueError(f"{output_dir!r} is {what} ({resolved}), which --overwrite would delete: give a folder "
                         "for this run, such as runs/my-run")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)
