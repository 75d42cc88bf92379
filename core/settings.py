"""Every environment variable the project reads, in one place, validated once at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
