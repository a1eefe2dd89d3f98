"""Response bodies, as typed objects.

They are the client's own copies of the server's schemas (the client must install without the server), and
lenient on purpose: a field a newer server adds is ignored, so an old client keeps working.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import numpy as np

AttentionMethod = Literal["rollout", "cls", "layer", "relevance"]
HeadFusion = Literal["mean", "max", "min"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())


class _Record(BaseModel):
    """Artifact facts the client shows but does not interpret: every field the server sends is kept."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())


class ErrorInfo(_Body):
    code: str
    message: str
    detail: Any = None


class Health(_Body):
    status: Literal["ok", "not_ready"] = "ok"
    models: dict[str, bool] = Field(default_factory=dict, description="model name -> loaded and warmed up")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Prediction(_Body):
    label: str
    index: int
    probability: float


class Timings(_Body):
    """Server-side milliseconds (the network and the client are not included)."""

    decode_ms: float
    preprocess_ms: float
    inference_ms: float
    total_ms: float


class ClassifyResponse(_Body):
    model: str
    version: str
    predictions: list[Prediction]
    timings: Timings
    request_id: str

    @property
    def top(self) -> Prediction:
        """The most probable class."""
        return self.predictions[0]


class BatchItem(_Body):
    index: int = Field(description="position of the image in the request")
    filename: str | None = None
    predictions: list[Prediction] | None = None
    error: ErrorInfo | None = Field(None, description="set instead of predictions when this image failed")

    @property
    def ok(self) -> bool:
        return self.error is None


class BatchResponse(_Body):
    model: str
    version: str
    results: list[BatchItem]
    timings: Timings
    request_id: str


class AttentionParams(_Body):
    layer: int | None = None
    head: int | None = None
    head_fusion: HeadFusion | None = None
    discard_ratio: float | None = None


class Grid(_Body):
    height: int
    width: int


class AttentionResponse(_Body):
    model: str
    version: str
    method: AttentionMethod
    params: AttentionParams
    grid: Grid
    map: list[list[float]] = Field(description="grid rows of attention, normalised to [0, 1]")
    target: Prediction | None = Field(None, description="method='relevance': the class the map explains")
    predictions: list[Prediction]
    timings: Timings
    request_id: str

    def to_numpy(self) -> np.ndarray:
        """The map as a (grid height, grid width) float32 array (needs numpy: `pip install vitserve-client[numpy]`)."""
        try:
            import numpy as np
        except ImportError as e:
            raise ImportError("to_numpy() needs numpy: pip install 'vitserve-client[numpy]'") from e
        return np.asarray(self.map, dtype=np.float32).reshape(self.grid.height, self.grid.width)


class AttentionBatchItem(_Body):
    index: int = Field(description="position of the image in the request")
    filename: str | None = None
    map: list[list[float]] | None = Field(None, description="grid rows of attention, normalised to [0, 1]")
    target: Prediction | None = Field(None, description="method='relevance': the class the map explains")
    predictions: list[Prediction] | None = None
    error: ErrorInfo | None = Field(None, description="set instead of map and predictions when this image failed")

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_numpy(self) -> np.ndarray:
        """The map as a (grid height, grid width) float32 array; ValueError for an image that failed."""
        if self.map is None:
            raise ValueError(f"image {self.index} has no map: {self.error.message if self.error else 'no result'}")
        try:
            import numpy as np
        except ImportError as e:
            raise ImportError("to_numpy() needs numpy: pip install 'vitserve-client[numpy]'") from e
        return np.asarray(self.map, dtype=np.float32)


class AttentionBatchResponse(_Body):
    model: str
    version: str
    method: AttentionMethod
    params: AttentionParams
    grid: Grid
    results: list[AttentionBatchItem]
    timings: Timings
    request_id: str


class AttentionPNG(_Body):
    """An attention overlay rendered by the server (`format="png"`)."""

    data: bytes
    request_id: str | None = None

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as f:
            f.write(self.data)


class Preprocessing(_Record):
    resize: str
    resize_size: tuple[int, int]
    crop_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Source(_Record):
    framework: str
    model: str


class Parity(_Record):
    reference: str
    passed: bool


class ModelInfo(_Body):
    name: str
    version: str
    precision: str
    provider: str
    labels_count: int
    labels: list[str]
    input_size: tuple[int, int]
    patch_size: int
    grid: Grid
    layers: int
    heads: int
    prefix_tokens: int
    attention: bool
    relevance: bool = False  # the artifact has the relevance graph (method="relevance"); absent from older servers
    preprocessing: Preprocessing
    source: Source
    parity: Parity
    default: bool


class ModelList(_Body):
    default: str
    models: list[ModelInfo]

    def get(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models if m.name == name), None)
