"""The recipe: everything a tenant can ask of a fine-tuning job, and nothing else.

One pydantic model is the single source of truth: the JSON Schema that generates the platform's
form, the defaults, the limits and the error messages all come from it. Fields never name code
to import (that would be remote code), only values.

Checks that involve several fields live in :func:`cross_field_issues` so they report the exact
field path; checks against the model registry live in :mod:`finetune.registry`.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.errors import Issue
from finetune.paths import bucket_path_problem, normalise_bucket_path

#: No grant on the platform exceeds one node of 8 GPUs per job; admission also checks the
#: tenant's own grant, which is usually smaller (the 2025 round lent 0.5, 1 or 4 GPUs).
MAX_GPUS_PER_JOB = 8


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _bucket_path(value: str) -> str:
    problem = bucket_path_problem(value)
    if problem:
        raise ValueError(problem)
    return normalise_bucket_path(value)


class HintedValueError(ValueError):
    """A validator's refusal that also says what to do; the hint reaches the tenant's issue."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


JOB_NAME_HINT = "use letters (any script), digits, '-', '_' and '.', for example 'support-bot-v2'"


def job_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a job, or None.

    The name becomes a folder and a file name on the platform, so it must be one harmless path
    segment: letters of any script, digits, ``-``, ``_`` and ``.``; no ``/`` or ``\\``, no
    leading ``.`` (hidden files, ``..``) or ``-`` (read as an option), no spaces or control characters.
    """
    if not name:
        return "a job name cannot be empty"
    if "/" in name or "\\" in name:
        return "a job name is a label, not a path: it cannot contain '/' or '\\'"
    if name[0] in ".-":
        return f"a job name cannot start with '{name[0]}'"
    for ch in name:
        if ch.isalnum() or ch in "-_." or unicodedata.category(ch).startswith("M"):  # marks: Devanagari, Thai...
            continue
        if ch.isspace():
            return "a job name cannot contain spaces"
        if unicodedata.category(ch).startswith("C"):
            return f"a job name cannot contain control or invisible characters (found U+{ord(ch):04X})"
        return f"a job name cannot contain {ch!r}"
    return None


def _job_name(value: str | None) -> str | None:
    problem = job_name_problem(value) if value is not None else None
    if problem:
        raise HintedValueError(problem, JOB_NAME_HINT)
    return value


# ------------------------------------------------------------------------------------ model


class CustomModel(Section):
    """A model the tenant uploaded to their bucket; trained only after origin review."""

    model_config = ConfigDict(title="Your own model")

    path: str = Field(
        title="Model folder",
        description="Folder inside your bucket holding the model in Hugging Face format (safetensors only).",
        examples=["models/my-base-model"],
    )
    developer: str = Field(
        title="Developer", description="The organisation that developed the weights.", min_length=2, max_length=200
    )
    country: str = Field(
        title="Developer country",
        description="Two-letter country code of the developer (ISO 3166-1), for example TW or US.",
        pattern=r"^[A-Z]{2}$",
    )

    _path = field_validator("path")(_bucket_path)


def _model_choice_schema(schema: dict[str, Any]) -> None:
    """Show the form a choice: an approved model (``id``) or your own (``custom``), never neither."""
    props = schema.pop("properties")
    schema.pop("type", None)
    schema["oneOf"] = [
        {
            "title": "Approved model",
            "type": "object",
            "properties": {"id": props["id"], "tiny": props["tiny"]},
            "required": ["id"],
            "additionalProperties": False,
        },
        {
            "title": "Your own model",
            "type": "object",
            "properties": {"custom": props["custom"], "tiny": props["tiny"]},
            "required": ["custom"],
            "additionalProperties": False,
        },
    ]
    schema.pop("additionalProperties", None)


class ModelSection(Section):
    """Which model to fine-tune."""

    model_config = ConfigDict(title="Model", json_schema_extra=_model_choice_schema)

    id: str | None = Field(
        default=None,
        title="Model",
        description="An approved model from the platform's list (`finetune models list`), "
        "for example llama-3.2-1b-instruct.",
        examples=["llama-3.2-1b-instruct"],
        max_length=80,
    )
    custom: CustomModel | None = Field(
        default=None,
        title="Your own model",
        description="Use a model you uploaded instead of one from the list. "
        "It is reviewed for origin before it can train.",
    )
    tiny: bool = Field(
        default=False,
        title="Tiny test model",
        description="Train a tiny random-weight model of the same architecture instead: "
        "a quick, cheap dry run of your data and settings. The result is not useful as a model.",
    )


# ------------------------------------------------------------------------------------ data

DataFormat = Literal["auto", "messages", "alpaca", "sharegpt", "text", "preference"]


class FieldMapping(Section):
    """Column names in your dataset, when they differ from the format's usual names."""

    model_config = ConfigDict(title="Column names")

    messages: str = Field(
        default="messages", title="Messages column", description="List of chat messages (messages format)."
    )
    role: str = Field(default="role", title="Role key", description="Key of a message's role (messages format).")
    content: str = Field(
        default="content", title="Content key", description="Key of a message's text (messages format)."
    )
    conversations: str = Field(
        default="conversations", title="Conversations column", description="ShareGPT conversation list."
    )
    instruction: str = Field(default="instruction", title="Instruction column", description="Alpaca instruction.")
    input: str = Field(default="input", title="Input column", description="Alpaca optional input.")
    output: str = Field(default="output", title="Output column", description="Alpaca answer.")
    system: str = Field(default="system", title="System column", description="Optional per-row system prompt.")
    text: str = Field(default="text", title="Text column", description="Plain text for continued pre-training.")
    prompt: str = Field(default="prompt", title="Prompt column", description="Preference data: the prompt.")
    chosen: str = Field(default="chosen", title="Chosen column", description="Preference data: the preferred answer.")
    rejected: str = Field(default="rejected", title="Rejected column", description="Preference data: the worse answer.")


class EvalSplit(Section):
    """Data held out to measure progress."""

    model_config = ConfigDict(title="Evaluation data")

    fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=0.5,
        title="Held-out fraction",
        description="Share of rows kept aside for evaluation (0 for none). Ignored when an eval file is given.",
    )
    path: str | None = Field(
        default=None,
        title="Eval file",
        description="A separate evaluation file inside your bucket, in the same format as the training data.",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else _bucket_path(value)


class BadRows(Section):
    """Rows that cannot be used are always reported; this decides whether the job goes on."""

    model_config = ConfigDict(title="Bad rows")

    policy: Literal["fail", "skip"] = Field(
        default="skip",
        title="Bad rows",
        description="What to do with rows that cannot be used: 'skip' them (each is reported), or 'fail' the job.",
    )
    max_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=0.5,
        title="Most rows skipped",
        description="With 'skip', the job still fails when more than this share of rows is bad (0.01 = 1%).",
    )


class DataSection(Section):
    """Your training data and how it becomes training sequences."""

    model_config = ConfigDict(title="Data")

    path: str = Field(
        title="Dataset",
        description="File or folder inside your bucket: JSONL, JSON, CSV or Parquet.",
        examples=["data/train.jsonl"],
    )
    format: DataFormat = Field(
        default="auto",
        title="Format",
        description="How rows are laid out. 'auto' detects it from the rows.",
    )
    fields: FieldMapping = Field(default_factory=FieldMapping, title="Column names")
    eval: EvalSplit = Field(default_factory=EvalSplit, title="Evaluation data")
    max_seq_len: int = Field(
        default=2048,
        ge=64,
        le=131072,
        title="Maximum sequence length",
        description="Longest sample in tokens. Longer samples follow the truncation policy.",
    )
    packing: bool = Field(
        default=True,
        title="Packing",
        description="Pack several samples into each sequence (faster; samples never see each other).",
    )
    truncation: Literal["drop", "truncate", "fail"] = Field(
        default="drop",
        title="Too-long samples",
        description="'drop' them (counted), 'truncate' them to the maximum length (counted), or 'fail' the job.",
    )
    duplicates: Literal["drop", "keep", "fail"] = Field(
        default="drop",
        title="Exact duplicate rows",
        description="Rows repeating an earlier row: 'drop' them (counted, not as bad rows), 'keep' them, or 'fail'.",
    )
    bad_rows: BadRows = Field(default_factory=BadRows, title="Bad rows")
    system_prompt: str | None = Field(
        default=None,
        title="System prompt",
        description="Used for conversations that have none of their own.",
        max_length=8000,
    )
    train_on_inputs: bool = Field(
        default=False,
        title="Train on prompts too",
        description="Also learn the user and system text. Off: only assistant answers are learned.",
    )
    assistant_turns: Literal["all", "last"] = Field(
        default="all",
        title="Assistant turns learned",
        description="Learn every assistant turn of a conversation, or only the last one.",
    )

    _path = field_validator("path")(_bucket_path)


# ------------------------------------------------------------------------------------ method

_READ_ONLY: dict[str, Any] = {"readOnly": True}
#: Each method names its type, so a form validator can tell the variants apart by it alone.
_TYPE_REQUIRED: dict[str, Any] = {"required": ["type"]}


class FullMethod(Section):
    """Update every weight of the model: most capable, needs the most GPU memory."""

    model_config = ConfigDict(title="Full fine-tuning", json_schema_extra=_TYPE_REQUIRED)
    type: Literal["full"] = Field(
        default="full", title="Method", description="Update every weight of the model.", json_schema_extra=_READ_ONLY
    )


class LoraMethod(Section):
    """Train small low-rank adapters beside frozen weights: fast, little memory, small archive."""

    model_config = ConfigDict(title="LoRA", json_schema_extra=_TYPE_REQUIRED)
    type: Literal["lora"] = Field(
        default="lora", title="Method", description="Train small adapter matrices (LoRA).", json_schema_extra=_READ_ONLY
    )
    rank: int = Field(default=16, ge=1, le=512, title="Rank", description="Adapter size. 8-64 suits most tasks.")
    alpha: int = Field(
        default=32, ge=1, le=4096, title="Alpha", description="Adapter scaling; commonly twice the rank."
    )
    dropout: float = Field(default=0.05, ge=0.0, le=0.5, title="Dropout", description="Dropout on the adapter input.")
    target_modules: (
        Annotated[Literal["all-linear"], Field(title="All linear layers", json_schema_extra=_READ_ONLY)]
        | Annotated[list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]+$")]], Field(title="Listed modules")]
    ) = Field(
        default="all-linear",
        title="Target modules",
        description="'all-linear' (every linear projection of the model), or a list of module names such as q_proj.",
    )
    dora: bool = Field(default=False, title="DoRA", description="Weight-decomposed LoRA: sometimes better, slower.")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one module name, or 'all-linear'")
        return value


class QloraMethod(LoraMethod):
    """LoRA over a 4-bit quantised copy of the model: the least memory. CUDA GPUs only."""

    model_config = ConfigDict(title="QLoRA", json_schema_extra=_TYPE_REQUIRED)
    type: Literal["qlora"] = Field(  # type: ignore[assignment]
        default="qlora",
        title="Method",
        description="LoRA on a 4-bit quantised model: least memory (CUDA GPUs only).",
        json_schema_extra=_READ_ONLY,
    )
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", title="4-bit type", description="nf4 suits most models.")
    double_quant: bool = Field(
        default=True, title="Double quantisation", description="Saves about 0.4 bits per weight."
    )


Method = Annotated[FullMethod | LoraMethod | QloraMethod, Field(discriminator="type")]
METHOD_TYPES = ("full", "lora", "qlora")


# ------------------------------------------------------------------------------------ training


class EarlyStopping(Section):
    """Stop when the evaluation loss stops improving."""

    model_config = ConfigDict(title="Early stopping")

    patience: int | None = Field(
        default=None,
        ge=1,
        le=100,
        title="Patience",
        description="Stop after this many evaluations without improvement. Empty: never stop early.",
    )
    min_delta: float = Field(default=0.0, ge=0.0, le=10.0, title="Minimum improvement", description="In eval loss.")


class TrainingSection(Section):
    """How long and how fast the model learns."""

    model_config = ConfigDict(title="Training")

    epochs: float = Field(default=3.0, gt=0.0, le=100.0, title="Epochs", description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        title="Maximum steps",
        description="Stop after this many steps (overrides epochs).",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0.0,
        le=0.01,
        title="Learning rate",
        description="Peak learning rate. Empty: 2e-4 for LoRA/QLoRA, 1e-5 for full fine-tuning.",
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", title="Schedule", description="How the learning rate decays after warm-up."
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0.0, le=0.5, title="Warm-up share", description="Share of steps spent warming up."
    )
    warmup_steps: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        title="Warm-up steps",
        description="Exact warm-up steps (overrides the share).",
    )
    weight_decay: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        title="Weight decay",
        description="Pulls weights towards zero; 0 suits most fine-tuning.",
    )
    max_grad_norm: float = Field(
        default=1.0, gt=0.0, le=100.0, title="Gradient clipping", description="Largest gradient norm."
    )
    micro_batch_size: int = Field(
        default=1, ge=1, le=1024, title="Micro batch", description="Sequences per GPU per forward pass."
    )
    gradient_accumulation_steps: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        title="Gradient accumulation",
        description="Micro batches per optimizer step. Empty: derived from tokens per step, else 1.",
    )
    tokens_per_step: int | None = Field(
        default=None,
        ge=1024,
        le=67_108_864,
        title="Tokens per step",
        description="Target tokens per optimizer step across all GPUs; sets gradient accumulation for you.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", title="Precision", description="'auto': bf16 on GPUs, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        default=True, title="Gradient checkpointing", description="Saves memory for about 20-30% more compute."
    )
    seed: int = Field(
        default=42, ge=0, le=2**31 - 1, title="Seed", description="Makes data order and initialisation repeatable."
    )
    eval_every_steps: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        title="Evaluate every",
        description="Steps between evaluations. Empty: once per epoch.",
    )
    save_every_steps: int | None = Field(
        default=None, ge=1, le=1_000_000, title="Checkpoint every (steps)", description="Empty: by time only."
    )
    save_every_minutes: float = Field(
        default=30.0, ge=1.0, le=1440.0, title="Checkpoint every (minutes)", description="Checkpoints also go by time."
    )
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping, title="Early stopping")


class ResourcesSection(Section):
    """GPUs and memory strategy."""

    model_config = ConfigDict(title="Resources")

    gpus: int = Field(
        default=1,
        ge=1,
        le=MAX_GPUS_PER_JOB,
        title="GPUs",
        description=f"GPUs for this job, within your grant (at most {MAX_GPUS_PER_JOB}).",
    )
    zero_stage: Literal["auto", 0, 2, 3] = Field(
        default="auto",
        title="ZeRO stage",
        description="DeepSpeed memory sharding. 'auto' picks the fastest stage that fits.",
    )
    offload: Literal["none", "optimizer", "all"] = Field(
        default="none",
        title="CPU offload",
        description="Move optimizer state (or parameters too) to CPU memory: fits bigger models, runs slower.",
    )


class OutputSection(Section):
    """What the job leaves in your bucket."""

    model_config = ConfigDict(title="Output")

    archive: Literal["merged", "adapter", "both"] = Field(
        default="merged",
        title="Archive contents",
        description="'merged': a complete model. 'adapter': the LoRA adapter only. 'both'.",
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, le=20, title="Checkpoints kept", description="Newest checkpoints kept in your bucket."
    )


class Recipe(Section):
    """A fine-tuning job, as a tenant describes it."""

    model_config = ConfigDict(title="Fine-tuning recipe")

    version: Literal[1] = Field(
        default=1, title="Recipe version", description="Always 1 for now.", json_schema_extra={"readOnly": True}
    )
    name: str | None = Field(
        default=None,
        title="Job name",
        description="A label for this job, also used as a folder name: letters (any script), digits, '-', '_' "
        "and '.'; no spaces, no '/', not starting with '.' or '-'.",
        min_length=1,
        max_length=120,
        examples=["support-bot-v2"],
    )
    model: ModelSection = Field(title="Model")
    data: DataSection = Field(title="Data")
    method: Method = Field(
        default_factory=LoraMethod,
        title="Method",
        description="Full fine-tuning, LoRA adapters, or QLoRA (LoRA on a 4-bit model). LoRA suits most jobs.",
    )
    training: TrainingSection = Field(default_factory=TrainingSection, title="Training")
    resources: ResourcesSection = Field(default_factory=ResourcesSection, title="Resources")
    output: OutputSection = Field(default_factory=OutputSection, title="Output")

    _name = field_validator("name")(_job_name)


def default_learning_rate(recipe: Recipe) -> float:
    if recipe.training.learning_rate is not None:
        return recipe.training.learning_rate
    return 1e-5 if recipe.method.type == "full" else 2e-4


def cross_field_issues(recipe: Recipe) -> list[Issue]:
    """Rules that involve several fields, each reported at the field a tenant should change."""
    issues: list[Issue] = []
    model = recipe.model
    if (model.id is None) == (model.custom is None):
        issues.append(
            Issue(
                "model",
                "give either an approved model 'id' or a 'custom' model, not both"
                if model.id
                else "choose a model: set 'id' to an approved model, or describe your own under 'custom'",
            )
        )
    t = recipe.training
    if t.max_steps is not None and t.warmup_steps is not None and t.warmup_steps >= t.max_steps:
        issues.append(
            Issue(
                "training.warmup_steps",
                f"warm-up ({t.warmup_steps} steps) must be shorter than training ({t.max_steps} steps)",
            )
        )
    if t.gradient_accumulation_steps is not None and t.tokens_per_step is not None:
        issues.append(
            Issue("training.tokens_per_step", "set either gradient_accumulation_steps or tokens_per_step, not both")
        )
    has_eval = recipe.data.eval.path is not None or recipe.data.eval.fraction > 0
    if t.early_stopping.patience is not None and not has_eval:
        issues.append(
            Issue(
                "training.early_stopping.patience",
                "early stopping needs evaluation data",
                hint="set data.eval.fraction above 0 or give data.eval.path",
            )
        )
    if t.eval_every_steps is not None and not has_eval:
        issues.append(
            Issue(
                "training.eval_every_steps",
                "evaluation needs evaluation data",
                hint="set data.eval.fraction above 0 or give data.eval.path",
            )
        )
    if recipe.output.archive != "merged" and recipe.method.type == "full":
        issues.append(
            Issue(
                "output.archive",
                f"'{recipe.output.archive}' needs an adapter: use method lora or qlora, or archive 'merged'",
            )
        )
    if recipe.data.eval.path is not None and recipe.data.eval.path == recipe.data.path:
        issues.append(Issue("data.eval.path", "the eval file must differ from the training data"))
    if recipe.data.format == "preference":
        issues.append(
            Issue(
                "data.format",
                "preference data is validated but cannot be trained yet",
                hint="use messages, alpaca, sharegpt or text",
            )
        )
    return issues
