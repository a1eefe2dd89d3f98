"""Typed request and response bodies of the REST API (they are the OpenAPI document's schemas)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from vit_artifact.attention import HeadFusion
from vit_artifact.metadata import Parity, Preprocessing, Source

# The attention routes' maps: vit_artifact.attention's methods, and relevance (from the relevance graph).
AttentionMethod = Literal["rollout", "cls", "layer", "relevance"]


class ErrorInfo(BaseModel):
    code: str = Field(examples=["bad_image"])
    message: str = Field(examples=["could not decode the image: cannot identify image file"])
    detail: object | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok", "not_ready"] = "ok"
    models: dict[str, bool] = Field(default_factory=dict, description="model name -> loaded and warmed up")
    reason: str | None = Field(None, description="why the server is not ready (absent when it is)")


class Prediction(BaseModel):
    label: str = Field(examples=["tabby cat"])
    index: int = Field(examples=[281])
    probability: float = Field(examples=[0.93])


class Timings(BaseModel):
    decode_ms: float
    preprocess_ms: float
    queue_ms: float = Field(description="waiting for the dynamic batcher")
    inference_ms: float = Field(description="the runtime call that served this request")
    batch_size: int = Field(description="images in that runtime call (coalesced across requests)")
    total_ms: float


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["digits-vit"])
    version: str = Field(examples=["1"])
    predictions: list[Prediction]
    timings: Timings
    request_id: str


class BatchItem(BaseModel):
    index: int = Field(description="position of the file in the request")
    filename: str | None = None
    predictions: list[Prediction] | None = None
    error: ErrorInfo | None = Field(None, description="set instead of predictions when this image failed")


class BatchResponse(BaseModel):
    model: str
    version: str
    results: list[BatchItem]
    timings: Timings
    request_id: str


class AttentionParams(BaseModel):
    layer: int | None = None
    head: int | None = None
    head_fusion: HeadFusion | None = None
    discard_ratio: float | None = None


class Grid(BaseModel):
    height: int
    width: int


class AttentionResponse(BaseModel):
    model: str
    version: str
    method: AttentionMethod
    params: AttentionParams
    grid: Grid
    map: list[list[float]] = Field(description="grid rows of attention, normalised to [0, 1]")
    target: Prediction | None = Field(None, description="method=relevance: the class the map explains")
    predictions: list[Prediction]
    timings: Timings
    request_id: str


class AttentionBatchItem(BaseModel):
    index: int = Field(description="position of the file in the request")
    filename: str | None = None
    map: list[list[float]] | None = Field(None, description="grid rows of attention, normalised to [0, 1]")
    target: Prediction | None = Field(None, description="method=relevance: the class the map explains")
    predictions: list[Prediction] | None = None
    error: ErrorInfo | None = Field(None, description="set instead of map and predictions when this image failed")


class AttentionBatchResponse(BaseModel):
    model: str
    version: str
    method: AttentionMethod
    params: AttentionParams
    grid: Grid
    results: list[AttentionBatchItem]
    timings: Timings
    request_id: str


class ModelInfo(BaseModel):
    name: str
    version: str
    precision: str
    provider: str = Field(description="onnxruntime execution provider running this model")
    labels_count: int
    labels: list[str]
    input_size: tuple[int, int]
    patch_size: int
    grid: Grid
    layers: int
    heads: int
    prefix_tokens: int
    attention: bool = Field(description="whether the artifact has the attention graph")
    relevance: bool = Field(False, description="whether the artifact has the relevance graph (method=relevance)")
    preprocessing: Preprocessing
    source: Source
    parity: Parity
    default: bool = Field(description="served by the routes without a model name")


class UnavailableModel(BaseModel):
    name: str
    error: str = Field(description="why it failed to load; its routes answer 503 with this message")


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]
    unavailable: list[UnavailableModel] = Field(
        default_factory=list, description="models that failed to load (VITSERVE_ON_MODEL_ERROR=skip)"
    )
