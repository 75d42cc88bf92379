"""Schema families per resource: `XCreate` (a request: extra="forbid", Field limits), `X` (the object),
`XList` (a page of them). Defaults are the paper's, as in the stage configs they are handed to; a
combination that a stage config refuses is refused here already (422), not minutes later in a worker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# --------------------------------------------------------------------------------------------------
# Shared


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
# Pair sets

AugmentFormat = Literal["sequence", "grid", "pic_in_pic"]
_ALL_FORMATS: list[AugmentFormat] = ["sequence", "grid", "pic_in_pic"]
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


class Generation(_Request):
    max_new_tokens: int = Field(512, ge=1, le=8192, description="Most new tokens per candidate.")
    num_candidates: int = Field(1, ge=1, le=32, description="Candidates per prompt (> 1 needs temperature > 0).")
    temperature: float = Field(0.0, ge=0, le=5, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts per generate call.")
    backend: Literal["hf", "vllm", "openai"] = Field("hf", description="hf (in-process), vllm, or an OpenAI-compatible server.")
    base_url: str | None = Field(
        None, max_length=2048, pattern=r"^https?://", description="The OpenAI-compatible server (backend openai)."
    )

    @model_validator(mode="after")
    def _check(self) -> Generation:
        if self.num_candidates > 1 and self.temperature == 0:
            raise ValueError("num_candidates > 1 needs temperature > 0 (greedy gives identical candidates)")
        if self.base_url is not None and self.backend != "openai":
            raise ValueError("base_url is only used by the openai backend")
        return self


class Selection(_Request):
    preset: Literal["paper", "official_code"] = Field("paper", description="Attention-ratio thresholds preset.")
    thresholds: dict[AugmentFormat, dict[int, Annotated[float, Field(ge=0, le=1)]]] | None = Field(
        None, description="Overrides by format then image count, e.g. {\"grid\": {\"9\": 0.35}}."
    )

    @model_validator(mode="after")
    def _check(self) -> Selection:
        from workers.select import SelectionConfig  # the one place thresholds are validated

        thresholds: dict[str, dict[int, float]] = {str(k): v for k, v in (self.thresholds or {}).items()}
        SelectionConfig(preset=self.preset, thresholds=thresholds)
        return self


class PostSelection(_Request):
    k: float = Field(1.5, gt=0, le=10, description="Tukey fence width in IQRs.")
    perplexity: bool = Field(True, description="Drop the high-perplexity tail of rejected answers.")
    length_ratio: bool = Field(True, description="Drop length ratios far from 1.")
    edit_distance: bool = Field(True, description="Drop near-identical chosen/rejected pairs.")


class PairSetCreate(_Request):
    dataset_id: str = Field(min_length=1, max_length=64, description="A ready dataset of yours.")
    model: str = Field("tiny-llava", min_length=1, max_length=512, description="HF model id, local path, or a built-in tiny model.")
    augmentation: Augmentation = Field(default_factory=Augmentation)
    generation: Generation = Field(default_factory=Generation)
    selection: Selection = Field(default_factory=Selection)
    post_selection: PostSelection = Field(default_factory=PostSelection)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="One seed for all randomness: same seed, same bytes.")
    shard_size: int = Field(200, ge=1, le=100_000, description="Prompts per shard job.")
    train: dict[str, Any] | None = Field(None, description="Training hyperparameters: train when the pairs are done.")


class PairSetProgress(BaseModel):
    done: int
    total: int


class PairSetRemoved(BaseModel):
    perplexity: int
    length_ratio: int
    edit_distance: int


class PairSetCounts(BaseModel):
    prompts: int
    candidates: int
    hallucinated: int
    pairs: int
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
    created_at: int
    started_at: int | None
    finished_at: int | None


class PairSetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PairSet]
    has_more: bool
