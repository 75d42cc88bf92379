"""Every environment variable the project reads, in one place, validated once at start."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# A generation endpoint's name, as the operator defines it and a request names it.
ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Settings(BaseSettings):
    """Process settings; `MIADPO_` prefix (REDIS_URL is also read bare, as docker-compose sets it)."""

    model_config = SettingsConfigDict(env_prefix="MIADPO_", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="Root of the artifact store.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("MIADPO_REDIS_URL", "REDIS_URL"),
        description="Redis for queues, job state and events.",
    )
    # Ingestion limits: what a hostile or broken upload may cost us.
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Largest accepted upload (bytes).")
    max_archive_bytes: int = Field(
        8 * 1024**3, gt=0, description="Largest total uncompressed size of an archive (zip-bomb guard)."
    )
    max_archive_members: int = Field(1_000_000, gt=0, description="Most members an archive may hold.")
    max_compression_ratio: float = Field(
        200.0, gt=1, description="Largest uncompressed/compressed ratio of one archive member."
    )
    max_image_pixels: int = Field(
        64_000_000, gt=0, description="Largest image (width x height) decoded (decompression-bomb guard)."
    )
    max_answer_chars: int = Field(
        512, gt=0, description="Samples whose answer has this many characters or more are skipped (paper)."
    )

    # Service: API keys, idempotency, jobs and workers.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API keys accepted as `Authorization: Bearer <key>`: a comma list, or @/path/file (one per line).",
    )
    idempotency_ttl_s: int = Field(24 * 3600, gt=0, description="How long an Idempotency-Key is remembered (s).")
    ui_session_ttl_s: int = Field(8 * 3600, gt=0, description="How long a web viewer sign-in lasts (s).")
    ui_secure_cookie: bool = Field(
        False, description="Mark the viewer's session cookie Secure even when the request looks like plain HTTP "
        "(behind a TLS-terminating proxy); over HTTPS it always is."
    )
    max_problems_listed: int = Field(
        100, ge=0, description="Most per-row problems kept in a dataset record (the count is always exact)."
    )
    job_retry_max: int = Field(3, ge=0, description="Retries of a job that failed on a transient fault.")
    job_retry_intervals: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [5, 20, 60],
        description="Backoff before each retry (s), comma list; the last one repeats.",
    )
    ingest_timeout_s: int = Field(3600, gt=0, description="Longest an ingest job may run (s).")
    pairset_timeout_s: int = Field(6 * 3600, gt=0, description="Longest one pair-set job may run (s).")
    training_timeout_s: int = Field(
        3 * 24 * 3600, gt=0, description="Longest one training job may run (s); a retry resumes from its last checkpoint."
    )
    worker_job_monitoring_interval_s: int = Field(
        5, gt=0, description="How often a busy worker heartbeats its running job (s)."
    )
    worker_heartbeat_grace_s: int = Field(
        15, gt=0, description="A running job with no heartbeat for interval + grace is abandoned (s)."
    )
    worker_maintenance_interval_s: int = Field(
        15, gt=0, description="How often workers look for abandoned jobs and clean RQ registries (s)."
    )
    worker_ttl_s: int = Field(
        30, ge=20, description="An idle worker heartbeats every ttl - 15 s; a silent one is dead after ttl + 60."
    )
    redis_backoff_max_s: float = Field(
        30.0, gt=0, description="Workers and trainer wait for an unreachable Redis with backoff from 0.5 s up to this (s)."
    )
    log_level: str = Field("INFO", description="Log level of the api and worker processes.")
    # Generation: what a pair set uses when its request does not say (the deployment decides).
    generation_backend: Literal["hf", "vllm", "openai"] = Field(
        "hf", description="Default generation backend of pair sets: hf, vllm or openai."
    )
    # What tenants may reach: they name an endpoint or a model, never a URL or a path (DESIGN 7).
    generation_endpoints: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="OpenAI-compatible servers (e.g. `vllm serve`) a pair set may name in `generation.endpoint`: "
        "`name=url,name2=url2` (each URL ending in /v1) or a JSON object.",
    )
    generation_endpoint: str | None = Field(
        None, description="The endpoint (a name of generation_endpoints) of a pair set that names none (backend openai)."
    )
    openai_api_key: str | None = Field(None, description="Bearer key for those servers, if they want one.")
    models_dir: Path | None = Field(
        None,
        description="Folder of the operator's models: a pair set may name `model: \"x\"` for `{models_dir}/x`. "
        "Besides those, only built-in names and hub ids already in the local Hugging Face cache are accepted.",
    )
    # Per-key quotas: what one key may hold of a shared (single-GPU) host at once. 0 = no limit.
    max_running_pairsets_per_key: int = Field(2, ge=0, description="Unfinished pair sets one key may have (queued or running).")
    max_running_trainings_per_key: int = Field(1, ge=0, description="Unfinished trainings one key may have (queued or running).")
    max_prompts_per_pairset: int = Field(20_000, ge=0, description="Most augmented prompts (`augmentation.num`) of one pair set.")
    max_steps_per_training: int = Field(
        5_000, ge=0, description="Most optimizer steps of one training (max_steps, or epochs x pairs / batch): how long one key holds a trainer."
    )
    max_storage_bytes_per_key: int = Field(
        50 * 1024**3, ge=0, description="Most bytes of datasets, uploads, pair sets and trainings one key may keep in the store."
    )
    # Request limits in front of the app (app.guard): what a request may cost before it is refused.
    max_json_body_bytes: int = Field(1024 * 1024, gt=0, description="Largest JSON (non-upload) request body (bytes).")
    body_idle_timeout_s: float = Field(
        30.0, gt=0, description="A request body that sends nothing for this long is dropped (408): slow or short bodies."
    )
    device: str | None = Field(None, description="Torch device of workers and trainer (default: cuda if present, else cpu).")
    train_processes: int | Literal["auto"] = Field(
        "auto",
        description="Processes one training runs on (`accelerate launch`, DDP): auto = every CUDA device of the "
        "trainer's machine, 1 on CPU; more than 1 on CPU trains with gloo.",
    )
    accelerate_config: Path | None = Field(
        None,
        description="An `accelerate config` file for multi-process training (e.g. deploy/accelerate/deepspeed-zero2.yaml); "
        "default: plain DDP.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _read_api_keys(cls, value: object) -> object:
        """`a,b`, or `@/path`: one key per line, `#` comments; a file keeps keys out of the environment."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"api_keys: cannot read {text[1:]!r}: {exc.strerror}") from None
            keys = [line.strip() for line in text.splitlines()]
            return [k for k in keys if k and not k.startswith("#")]
        return [k.strip() for k in text.split(",") if k.strip()]

    @field_validator("generation_endpoints", mode="before")
    @classmethod
    def _read_endpoints(cls, value: object) -> object:
        """`name=url,name2=url2` or a JSON object."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"generation_endpoints: expected name=url,name2=url2, got {value!r}")
        return {name.strip(): url.strip() for name, url in pairs}

    @field_validator("generation_endpoints")
    @classmethod
    def _check_endpoints(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            if not ENDPOINT_NAME.fullmatch(name):
                raise ValueError(f"generation endpoint name {name!r} must match {ENDPOINT_NAME.pattern}")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"generation endpoint {name!r} must be an http(s) URL, got {url!r}")
        return value

    @model_validator(mode="after")
    def _check_default_endpoint(self) -> Settings:
        if self.generation_endpoint is not None and self.generation_endpoint not in self.generation_endpoints:
            raise ValueError(f"generation_endpoint {self.generation_endpoint!r} is not one of generation_endpoints")
        return self

    @field_validator("accelerate_config", "models_dir", mode="before")
    @classmethod
    def _no_config(cls, value: object) -> object:
        return None if value == "" else value  # docker-compose passes an unset variable as ""

    @field_validator("train_processes")
    @classmethod
    def _check_processes(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"train_processes must be auto or an integer >= 1, got {value!r}")
        return value

    @field_validator("job_retry_intervals", mode="before")
    @classmethod
    def _split_intervals(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("job_retry_intervals")
    @classmethod
    def _check_intervals(cls, value: list[int]) -> list[int]:
        if not value or any(v < 0 for v in value):
            raise ValueError(f"job_retry_intervals must be non-negative seconds, at least one, got {value!r}")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
