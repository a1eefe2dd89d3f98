"""`serving.json`: an artifact's optional batching policy, beside `artifact.json` (like Triton's model config).

Every key is optional and overrides the server's setting of the same name for this model only, e.g.
`{"max_batch_size": 4}` for a model whose throughput is flat beyond batch 4, or `{"latency_budget_ms": 5000}` for a
model whose clients wait longer than the server's `VITSERVE_LATENCY_BUDGET_MS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vit_artifact.metadata import ArtifactError

SERVING_FILE = "serving.json"


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(None, gt=0)
    max_queue_delay_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, gt=0)
    timeout_s: float | None = Field(None, gt=0)
    enabled: bool | None = None
    latency_budget_ms: float | None = Field(None, gt=0)  # this model's VITSERVE_LATENCY_BUDGET_MS

    def overrides(self) -> dict[str, Any]:
        """Only the keys the file sets."""
        return self.model_dump(exclude_none=True)


def read_serving_config(directory: Path) -> ServingConfig:
    """The directory's `serving.json`, or an empty config where there is none; a bad file is an ArtifactError."""
    path = directory / SERVING_FILE
    if not path.is_file():
        return ServingConfig()
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not a JSON object of batching settings: {e}") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: not a JSON object of batching settings")
    unknown = set(data) - set(ServingConfig.model_fields)
    if unknown:
        raise ArtifactError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(ServingConfig.model_fields)}")
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ArtifactError(f"{path}: {problems}") from e
