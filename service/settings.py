"""All configuration: one `BaseSettings`, read from `VITSERVE_*` environment variables, validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITSERVE_", protected_namespaces=(), extra="ignore")

    model_dir: Path = Field(REPO_MODELS, description="model repository: one sub-directory per exported artifact")
    default_model: str = Field("digits-vit", description="model served by the routes without a model name")
    models: list[str] | None = Field(None, description="load only these models (JSON list); default: all")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    provider: Literal["auto", "cpu", "cuda"] = Field("auto", description="onnxruntime execution provider")
    threads: int = Field(0, ge=0, description="intra-op threads per session; 0 lets onnxruntime choose")
    max_body_bytes: int = Field(20 * 2**20, gt=0, description="request bodies above this get 413 while reading")
    max_pixels: int = Field(40_000_000, gt=0, description="images above this get 413 before decoding")
    max_batch_files: int = Field(32, gt=0, description="images allowed in one batch request")
    batching: bool = Field(True, description="coalesce concurrent requests into one runtime call")
    max_batch_size: int = Field(16, gt=0, description="images per runtime call (a model's serving.json may override)")
    max_queue_delay_ms: float = Field(2.0, ge=0, description="how long the first request waits for company")
    max_queue_size: int = Field(256, gt=0, description="queued requests per model before 503 + Retry-After")
    request_timeout_s: float = Field(30.0, gt=0, description="longest a request waits to be served")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model directory {value} does not exist; set VITSERVE_MODEL_DIR")
        return value
