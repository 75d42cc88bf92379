"""Schema families per resource: `XCreate` (a request: extra="forbid", Field limits), `X` (the object),
`XList` (a page of them). Defaults are the paper's, as in the stage configs they are handed to; a
combination that a stage config refuses is refused here already (422), not minutes later in a worker.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from trainer.config import LR_SCHEDULERS, TrainHyperparameters

# --------------------------------------------------------------------------------------------------
# Shared


# A model as a tenant names it: a built-in name, a folder name under the operator's MIADPO_MODELS_DIR, or a
# hub id (`org/name`) already in the server's cache; never a path (workers.models.resolve_model).
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$"
_MODEL_HELP = "A built-in model (tiny-llava, ...), a model of the operator's MIADPO_MODELS_DIR, or a hub id already in the server's cache."


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


AugmentFormat = Literal["sequence", "grid", "pic_in_pic"]
_ALL_FORMATS: list[AugmentFormat] = ["sequence", "grid", "pic_in_pic"]


class ErrorBody(BaseModel):
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, conflict_error, ...")
    code: str | None = Field(description="Machine-readable reason, e.g. dataset_not_ready.")
    message: str = Field(description="What went wrong, for a human.")
    param: str | None = Field(None, description="The parameter at fault, e.g. augmentation.num.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Status(BaseModel):
    status: str


class ResourceError(BaseModel):
    """Why a dataset or pair set failed."""

    code: str
    message: str


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True


class Event(BaseModel):
    """One entry of a resource's event stream."""

    id: str = Field(description="Stream id; use it as `after` (or SSE Last-Event-ID) to resume.")
    type: str = Field(description="created, status, cancel_requested, retry, warning, ...")
    data: dict[str, Any]
    created_at: int


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


# --------------------------------------------------------------------------------------------------
# Datasets

DatasetFormat = Literal["llava", "jsonl", "parquet"]


class DatasetCreate(_Request):
    """The form fields of an upload besides `file`."""

    name: str | None = Field(None, min_length=1, max_length=200, description="A name for people.")
    format: DatasetFormat | None = Field(None, description="Row format; detected from the file when omitted.")


class DatasetProblem(BaseModel):
    """A row that could not be used, and why (`row` is 0-based in the source file)."""

    row: int | None
    id: str | None
    code: str
    reason: str


class Dataset(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    name: str | None
    format: DatasetFormat | None = Field(description="As requested; after ingestion, as detected.")
    status: Literal["validating", "ready", "failed"]
    num_rows: int = Field(description="Rows read from the source.")
    num_samples: int = Field(description="Usable samples.")
    num_images: int = Field(description="Distinct images stored.")
    num_problems: int = Field(description="Rows that could not be used (all of them counted).")
    problems: list[DatasetProblem] = Field(description="The first problems (up to a server-side cap).")
    error: ResourceError | None
    created_at: int


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Dataset]
    has_more: bool


# --------------------------------------------------------------------------------------------------
# Training hyperparameters (used by pair sets' `train` and by trainings)

_HP_FIELDS = {f.name: f for f in dataclasses.fields(TrainHyperparameters)}


def _hp(name: str, **limits: Any) -> Any:
    """A hyperparameter's Field: its default and help from `TrainHyperparameters`, the limits it checks."""
    spec = _HP_FIELDS[name]
    return Field(spec.default, description=spec.metadata["help"], **limits)


class TrainingHyperparameters(_Request):
    """DPO + LoRA hyperparameters; omitted ones take the paper's defaults. The limits mirror
    `trainer.config.TrainHyperparameters`, which has the last word: every value is also checked by it."""

    model_config = ConfigDict(extra="forbid", strict=True)  # true is not 1, "0.1" is not a number

    beta: float = _hp("beta", gt=0, allow_inf_nan=False)
    dpo_weight: float = _hp("dpo_weight", ge=0, allow_inf_nan=False)
    nll_weight: float = _hp("nll_weight", ge=0, allow_inf_nan=False)
    learning_rate: float = _hp("learning_rate", gt=0, le=1)
    num_epochs: int = _hp("num_epochs", ge=1, le=1000)
    per_device_batch_size: int = _hp("per_device_batch_size", ge=1, le=4096)
    gradient_accumulation_steps: int = _hp("gradient_accumulation_steps", ge=1, le=4096)
    effective_batch_size: int | None = _hp("effective_batch_size", ge=1, le=65536)
    warmup_ratio: float = _hp("warmup_ratio", ge=0, lt=1)
    lr_scheduler: str = _hp("lr_scheduler", json_schema_extra={"enum": list(LR_SCHEDULERS)})
    weight_decay: float = _hp("weight_decay", ge=0, allow_inf_nan=False)
    max_grad_norm: float = _hp("max_grad_norm", ge=0, allow_inf_nan=False)
    lora_r: int = _hp("lora_r", ge=1, le=1024)
    lora_alpha: int = _hp("lora_alpha", ge=1, le=65536)
    lora_dropout: float = _hp("lora_dropout", ge=0, lt=1)
    lora_target: str = _hp("lora_target", min_length=1, max_length=2000)
    max_length: int | None = _hp("max_length", ge=1, le=131072)
    seed: int = _hp("seed", ge=0, le=2**32 - 1)
    max_steps: int | None = _hp("max_steps", ge=1, le=10_000_000)
    gradient_checkpointing: bool = _hp("gradient_checkpointing")
    logging_steps: int = _hp("logging_steps", ge=1, le=1_000_000)
    fast_path: bool = _hp("fast_path")
    precompute_ref_logps: bool = _hp("precompute_ref_logps")

    @field_validator("*")
    @classmethod
    def _check_one(cls, value: Any, info: ValidationInfo) -> Any:
        # Each value alone (the others at their defaults), so that an error names its parameter.
        TrainHyperparameters.from_dict({str(info.field_name): value})
        return value

    @model_validator(mode="after")
    def _check_all(self) -> TrainingHyperparameters:
        TrainHyperparameters.from_dict(self.model_dump())
        return self


# --------------------------------------------------------------------------------------------------
# Evaluations (used by trainings' `evaluation` too)


class EvaluationSpec(_Request):
    """What to evaluate on: held-out prompts made the MIA-DPO way from a dataset with ground truth."""

    dataset_id: str = Field(min_length=1, max_length=64, description="A ready dataset of yours, held out from training.")
    formats: list[AugmentFormat] = Field(
        default_factory=lambda: list(_ALL_FORMATS), min_length=1, max_length=3,
        description="Formats of the multi-image prompts (each sample is also asked alone).",
    )  # fmt: skip
    num: int = Field(100, ge=1, le=100_000, description="Multi-image prompts.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Same seed, same prompts.")
    max_new_tokens: int = Field(32, ge=1, le=8192, description="Most new tokens per answer.")
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts per generate call.")
    shard_size: int = Field(200, ge=1, le=100_000, description="Prompts per shard job.")

    @model_validator(mode="after")
    def _check(self) -> EvaluationSpec:
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats must not repeat")
        return self


class TrainingSpec(_Request):
    """What to train on a pair set: the `train` of a pair set, and the body of a training besides `pairset_id`."""

    model: str | None = Field(
        None, max_length=193, pattern=MODEL_PATTERN, description="The model to adapt; default: the pair set's model. " + _MODEL_HELP
    )
    preset: Literal["paper", "official_code"] = Field(
        "paper",
        description="Hyperparameters as the paper (3 epochs, NLL weight 0.1) or the official script (1 epoch, NLL "
        "weight 0, effective batch 64, LoRA dropout 0, warm-up 0.1 linear) has them; explicit hyperparameters win.",
    )
    hyperparameters: TrainingHyperparameters = Field(default_factory=TrainingHyperparameters)
    checkpoint_every: int = Field(
        100, ge=1, le=10_000_000, description="Optimizer steps between checkpoints (and one at the last step)."
    )
    evaluation: EvaluationSpec | None = Field(
        None,
        description="Evaluate the base model and the trained adapter on these held-out prompts once the training has "
        "succeeded; the training shows both results side by side.",
    )

    @model_validator(mode="after")
    def _apply_preset(self) -> TrainingSpec:
        from trainer.config import TRAINING_PRESETS  # the one place presets are defined

        hp = self.hyperparameters
        explicit = hp.model_fields_set if "hyperparameters" in self.model_fields_set else set()
        values = {
            name: value
            for name, value in TRAINING_PRESETS[self.preset].items()
            # An explicit accumulation says how big a step is: the preset's effective batch does not apply.
            if name not in explicit and not (name == "effective_batch_size" and "gradient_accumulation_steps" in explicit)
        }
        if values:
            self.hyperparameters = TrainingHyperparameters.model_validate({**hp.model_dump(exclude_unset=True), **values})
        return self


# --------------------------------------------------------------------------------------------------
# Pair sets

Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class AugmentationMix(_Request):
    """Relative weights (any positive scale); omitted tables keep the official mix."""

    formats: dict[AugmentFormat, Weight] | None = Field(None, description="Weight of each format.")
    sequence_counts: dict[int, Weight] | None = Field(None, description="Weight of 2-5 image sequences.")
    grid_counts: dict[int, Weight] | None = Field(None, description="Weight of 2, 3, 4, 6, 9 cell grids.")


class Augmentation(_Request):
    num: int = Field(100, ge=1, le=1_000_000, description="Augmented prompts to make.")
    formats: list[AugmentFormat] = Field(
        default_factory=lambda: list(_ALL_FORMATS), min_length=1, max_length=3, description="Formats to use."
    )
    mix: AugmentationMix | None = Field(None, description="Proportions; default: the official mix.")

    @model_validator(mode="after")
    def _check(self) -> Augmentation:
        from workers.augment import AugmentMix  # the one place mixes are validated

        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats must not repeat")
        given = self.mix.model_dump(exclude_none=True) if self.mix else {}
        AugmentMix(**given).only(self.formats)
        return self


class Noise(_Request):
    """Gaussian noise on the images generation sees for one format (the export keeps them clean)."""

    std: float = Field(ge=0, le=255, description="Standard deviation in pixel units.")
    region: Literal["target", "image"] = Field(
        "target", description="target: the target's cell, inset or image; image: the whole image holding it."
    )


class Generation(_Request):
    max_new_tokens: int = Field(512, ge=1, le=8192, description="Most new tokens per candidate.")
    num_candidates: int = Field(1, ge=1, le=32, description="Candidates per prompt (> 1 needs temperature > 0).")
    temperature: float = Field(0.0, ge=0, le=5, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts per generate call.")
    backend: Literal["hf", "vllm", "openai"] | None = Field(
        None,
        description="hf (in-process), vllm, or an OpenAI-compatible server; default: the deployment's "
        "(MIADPO_GENERATION_BACKEND of the gpu workers), written here when the first shard runs.",
    )
    endpoint: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="The OpenAI-compatible server (backend openai), by the name the operator gave it "
        "(MIADPO_GENERATION_ENDPOINTS); default: the deployment's (MIADPO_GENERATION_ENDPOINT).",
    )
    noise: dict[AugmentFormat, Noise] = Field(
        default_factory=dict,
        description="Per format, Gaussian noise on the images the model answers, to provoke more hallucinations "
        "(preset official_code: grid std 225 on the target, pic_in_pic std 49 on the whole image); none by default.",
    )

    @model_validator(mode="after")
    def _check(self) -> Generation:
        if self.num_candidates > 1 and self.temperature == 0:
            raise ValueError("num_candidates > 1 needs temperature > 0 (greedy gives identical candidates)")
        if self.endpoint is not None and self.backend != "openai":
            raise ValueError("endpoint is only used by the openai backend")
        return self


Comparison = Literal["<=", "<"]


def _all_at_most() -> dict[AugmentFormat, Comparison]:
    return {"sequence": "<=", "grid": "<=", "pic_in_pic": "<="}


class Selection(_Request):
    thresholds: dict[AugmentFormat, dict[int, Annotated[float, Field(ge=0, le=1)]]] | None = Field(
        None, description="Overrides of the preset's thresholds by format then image count, e.g. {\"grid\": {\"9\": 0.35}}."
    )
    attention_rows: Literal["answer_tokens", "producing"] = Field(
        "producing",
        description="Which query rows make the attention ratio: the rows producing the answer's tokens (the `paper` "
        "preset's: they separate wrong-image answers better, docs/fidelity.md) or the rows at them (the official "
        "code's, the `official_code` preset's).",
    )
    comparison: dict[AugmentFormat, Comparison] = Field(
        default_factory=_all_at_most,
        description="Per format, hallucinated when ratio <= threshold or ratio < threshold (official_code: < for grid and pic_in_pic).",
    )
    perplexity_gate: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Reject only answers whose perplexity (official: from max-softmax, EOS step included) is above this "
        "(official_code: 1.1); null: no gate.",
    )

    @model_validator(mode="after")
    def _check(self) -> Selection:
        from workers.select import SelectionConfig  # the one place thresholds are validated

        thresholds: dict[str, dict[int, float]] = {str(k): v for k, v in (self.thresholds or {}).items()}
        SelectionConfig(thresholds=thresholds)  # both presets' tables have the same image counts
        return self


class PostSelection(_Request):
    k: float = Field(1.5, gt=0, le=10, description="Tukey fence width in IQRs.")
    perplexity: bool = Field(True, description="Drop the high-perplexity tail of rejected answers.")
    length_ratio: bool = Field(True, description="Drop length ratios far from 1.")
    edit_distance: bool = Field(True, description="Drop near-identical chosen/rejected pairs.")


class PairSetCreate(_Request):
    dataset_id: str = Field(min_length=1, max_length=64, description="A ready dataset of yours.")
    preset: Literal["paper", "official_code"] = Field(
        "paper",
        description="The method's settings as the paper (paper) or the released scripts (official_code) have them: "
        "thresholds, comparisons, attention rows, noise, perplexity gate, post-selection filters. Fields set "
        "explicitly win over the preset; the stored config holds every effective value.",
    )
    model: str = Field("tiny-llava", max_length=193, pattern=MODEL_PATTERN, description=_MODEL_HELP)
    augmentation: Augmentation = Field(default_factory=Augmentation)
    generation: Generation = Field(default_factory=Generation)
    selection: Selection = Field(default_factory=Selection)
    post_selection: PostSelection = Field(default_factory=PostSelection)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="One seed for all randomness: same seed, same bytes.")
    shard_size: int = Field(200, ge=1, le=100_000, description="Prompts per shard job.")
    train: TrainingSpec | None = Field(None, description="Train an adapter on the pairs when they are done (a training is created).")

    @model_validator(mode="after")
    def _apply_preset(self) -> PairSetCreate:
        from workers.pipeline import PIPELINE_PRESETS  # the one place presets are defined

        for path, value in PIPELINE_PRESETS[self.preset].items():
            section, name = path.split(".")
            part = getattr(self, section)
            if section in self.model_fields_set and name in part.model_fields_set:
                continue  # the user's own value wins
            setattr(self, section, type(part).model_validate({**part.model_dump(exclude_unset=True), name: value}))
        return self


class PairSetProgress(BaseModel):
    done: int
    total: int


class PairSetRemoved(BaseModel):
    perplexity: int
    length_ratio: int
    edit_distance: int
    perplexity_gate: int = Field(0, description="Prompts whose only rejectable answers the perplexity gate dropped.")


class PairSetCounts(BaseModel):
    prompts: int
    candidates: int
    hallucinated: int
    pairs: int
    distractors_from_source: int = Field(
        0, description="Prompts whose distractor images come from the target's own source (coco, gqa, ...), as the official code draws them."
    )
    box_samples_skipped: int = Field(
        0, description="Samples with box coordinates passed over as grid or pic-in-pic targets (wrong on a collage)."
    )
    removed: PairSetRemoved


class PairSet(BaseModel):
    id: str
    object: Literal["pairset"] = "pairset"
    dataset_id: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None = Field(description="The pipeline stage now running (augment, generate, ...).")
    progress: PairSetProgress
    counts: PairSetCounts
    error: ResourceError | None
    config: PairSetCreate = Field(description="The create request, defaults filled in.")
    training_id: str | None = Field(None, description="The training that `train` started, once the pairs were done.")
    created_at: int
    started_at: int | None
    finished_at: int | None


class PairSetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PairSet]
    has_more: bool


class Pair(BaseModel):
    """One exported preference pair, as previewed: its text and metadata, and where its images are."""

    uid: str = Field(description="The pair's id, `{seed}-{index}`; use it as `after` for the next page.")
    source_id: str = Field(description="Id of the dataset sample the question and chosen answer come from.")
    format: Literal["sequence", "grid", "pic_in_pic"]
    n_images: int = Field(description="Images the model sees: sequence: 2-5 separate images; grid and pic_in_pic: 1 (the collage).")
    target_index: int = Field(
        description="Which source image the question is about, 0-based. sequence: its position among the images "
        "(`In Image{target_index + 1}`); grid: its cell in the collage, row-major (the cell labelled "
        "`Image{target_index + 1}`), so it may exceed n_images - 1; pic_in_pic: always 1, the inset in the centre "
        "(0 is the background)."
    )
    prompt: str = Field(description="The user turn, `<image>` where each image goes.")
    chosen: str = Field(description="The ground-truth answer.")
    rejected: str = Field(description="The model's answer that attended to the wrong image.")
    attention_ratio: float | None = Field(description="Attention on the target image / on all images.")
    perplexity: float | None = Field(description="Perplexity of the rejected answer under the model.")
    length_ratio: float | None = Field(description="Rejected / chosen length, in tokens.")
    edit_distance: float | None = Field(description="Normalised edit distance between chosen and rejected.")
    image_urls: list[str] = Field(description="One URL per image (PNG), in prompt order.")


class PairList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Pair]
    has_more: bool


class PromptCandidate(BaseModel):
    """One generated answer to a prompt and how selection judged it."""

    index: int = Field(description="0-based position among the prompt's candidates.")
    text: str
    num_tokens: int
    finish_reason: str | None = Field(description="stop, or length when cut at max_new_tokens.")
    ratio: float | None = Field(description="Its attention ratio (target / all), compared with the prompt's threshold.")
    perplexity: float | None
    hallucinated: bool = Field(description="The verdict: judged a hallucination (a rejected-answer candidate).")
    reason: str | None = Field(description="Why it was (or was not) judged so.")
    heatmap_urls: list[str] = Field(description="Per image, its attention drawn over the image (PNG); empty without stored attention.")


class Prompt(BaseModel):
    """One augmented prompt of a pair set, whether or not it became a pair."""

    uid: str = Field(description="`{seed}-{index}`; use it as `after` for the next page.")
    format: Literal["sequence", "grid", "pic_in_pic"]
    n_images: int = Field(description="Source images in the prompt (cells of a grid; 2 for pic-in-pic).")
    target_index: int
    question: str = Field(description="The original question.")
    prompt: str = Field(description="The rewritten user turn, `<image>` where each image goes.")
    answer: str = Field(description="The ground truth (the chosen side of a pair).")
    outcome: Literal["exported", "no_pair", "perplexity_gate", "perplexity", "length_ratio", "edit_distance"] = Field(
        description="exported; no_pair (no candidate judged a hallucination); perplexity_gate; or the post-selection filter that removed the pair."
    )
    threshold: float | None = Field(description="The attention-ratio threshold of its format and image count.")
    comparison: str = Field(description="How a ratio is compared with the threshold (`<=` or `<`) to judge a hallucination.")
    attention_rows: str | None
    rejected: int | None = Field(description="Index of the candidate chosen as the rejected answer, if any.")
    stats: dict[str, float | None] | None = Field(description="The pair's perplexity, length_ratio, edit_distance (post-selection).")
    image_urls: list[str] = Field(description="The images the model was given (one collage for grid and pic-in-pic), PNG.")
    candidates: list[PromptCandidate]


class PromptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Prompt]
    has_more: bool
    total: int = Field(description="Prompts matching the filters, in all.")


# --------------------------------------------------------------------------------------------------
# Trainings


class TrainingCreate(TrainingSpec):
    pairset_id: str = Field(min_length=1, max_length=64, description="A succeeded pair set of yours.")


class TrainingProgress(BaseModel):
    step: int = Field(description="Optimizer steps done (a resumed training counts those before it resumed).")
    total_steps: int = Field(description="Planned optimizer steps; known once the training has started (or from max_steps).")


class TrainingCheckpoints(BaseModel):
    count: int = Field(description="Complete checkpoints in the store.")
    last_step: int | None = Field(description="Step of the latest one.")


class TrainingAdapter(BaseModel):
    size_bytes: int = Field(description="Size of the adapter archive (.tar.gz).")
    url: str = Field(description="Where to download it.")


class Training(BaseModel):
    id: str
    object: Literal["training"] = "training"
    pairset_id: str
    model: str
    preset: Literal["paper", "official_code"] = Field("paper", description="The training preset the hyperparameters came from.")
    hyperparameters: TrainingHyperparameters = Field(description="As trained: the preset and defaults filled in.")
    checkpoint_every: int
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: TrainingProgress
    metrics: dict[str, float] = Field(
        description="The latest logged step's metrics: loss, rewards/chosen, rewards/rejected, rewards/margins, "
        "rewards/accuracies, logps/..., grad_norm (TRL's names)."
    )
    checkpoints: TrainingCheckpoints
    adapter: TrainingAdapter | None = Field(description="The trained adapter, once the training has succeeded.")
    evaluation: TrainingEvaluation | None = Field(None, description="Base model vs adapter, when `evaluation` was asked for.")
    error: ResourceError | None
    created_at: int
    started_at: int | None
    finished_at: int | None


class TrainingEvaluationEntry(BaseModel):
    id: str = Field(description="The evaluation (ev_...).")
    status: str
    result: dict[str, Any] | None = Field(description="Its result once it has succeeded (see Evaluation.result).")


class TrainingEvaluation(BaseModel):
    """A training's own evaluation: the base model and the adapter on the same prompts."""

    request: EvaluationSpec
    base: TrainingEvaluationEntry | None = Field(description="The base model's evaluation, once the training has succeeded.")
    adapter: TrainingEvaluationEntry | None = Field(description="The adapter's evaluation, once the training has succeeded.")


class TrainingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Training]
    has_more: bool


class TrainingCheckpoint(BaseModel):
    """A complete checkpoint: the step it was saved at, that step's metrics, and its adapter files."""

    step: int
    metrics: dict[str, float]
    created_at: int
    url: str = Field(description="Download of its adapter and processor files (.tar.gz).")


class TrainingCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TrainingCheckpoint]
    has_more: bool


class EvaluationCreate(EvaluationSpec):
    model: str = Field(
        "tiny-llava", max_length=193, pattern=MODEL_PATTERN,
        description="The model to evaluate; with `training_id`, default: that training's model. " + _MODEL_HELP,
    )  # fmt: skip
    training_id: str | None = Field(
        None, min_length=1, max_length=64, description="Evaluate this succeeded training's adapter (merged into the model)."
    )


class Evaluation(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    model: str
    training_id: str | None
    dataset_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None = Field(description="generate, then summarise.")
    progress: PairSetProgress = Field(description="Multi-image prompts answered (with their single-image twin).")
    result: dict[str, Any] | None = Field(
        description="Once succeeded: `matching_rule`; `multi_image` {n, accuracy, format_average, confused_rate, "
        "per_format, per_image_count}; `single_image` {n, accuracy}; `attention_auc` per format and attention_rows "
        "setting (how well the attention ratio tells right answers from confused ones)."
    )
    error: ResourceError | None
    config: EvaluationCreate = Field(description="The create request, defaults filled in.")
    created_at: int
    started_at: int | None
    finished_at: int | None


class EvaluationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Evaluation]
    has_more: bool


class EvaluationSample(BaseModel):
    """One prompt of an evaluation: what the model said, the truth of every image, the verdicts."""

    uid: str = Field(description="`{seed}-{index}`; use it as `after` for the next page.")
    sample_id: str
    format: Literal["sequence", "grid", "pic_in_pic"]
    n_images: int
    target_index: int
    prompt: str
    answer: str
    truth: str
    truths: list[str | None] = Field(description="Per image, its answer to the question (null: the dataset has none).")
    correct: bool
    confused_with: int | None = Field(description="The other image whose truth the answer gave, if any.")
    ratios: dict[str, float | None] = Field(description="The answer's attention ratio per attention_rows setting.")
    single: dict[str, Any] = Field(description="The sample asked alone: {prompt, answer, correct}.")


class EvaluationSampleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvaluationSample]
    has_more: bool
