"""The artifact: the contract between `model_export` and `service`.

An artifact is a directory::

    models/<name>/
        artifact.json     the one metadata record (this module's `ArtifactMetadata`)
        model.onnx        classify graph: pixels -> logits (attention fused away, nothing extra computed)
        attention.onnx    attention graph: pixels -> logits, attentions (B, layers, heads, tokens, tokens)
        relevance.onnx    relevance graph: pixels, target class (B,) -> logits, relevance maps (B, grid_h, grid_w)
                          (FP32 artifacts only; absent from artifacts exported before it existed)

Separate graphs because classification must not pay for attention: the classify graph is a plain logits-only
export, the attention graph also outputs the probabilities (179 MB per batch of 8 for ViT-B/16). Every fact the service
needs (labels, preprocessing, token grid, prefix tokens) is read from `artifact.json` and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

METADATA_FILE = "artifact.json"
FORMAT_VERSION = 1
INPUT_NAME = "pixel_values"
LOGITS = "logits"
ATTENTIONS = "attentions"
TARGET_NAME = "target"  # the relevance graph's second input: one class index per image, int64
RELEVANCE = "relevance"
GraphRole = Literal["classify", "attention", "relevance"]

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
Precision = Literal["fp32", "fp16", "int8"]
CropOffset = Literal["floor", "round"]
Calibration = Literal["minmax", "percentile", "entropy"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocessing(_Record):
    """How an RGB image becomes the model's input tensor, as the source framework does it at eval time.

    resize = "squash": resize to `resize_size` (height, width) exactly, ignoring aspect (HF ViT).
    resize = "shortest_edge": scale so the shorter side is `resize_size[0]`, keeping aspect (timm).
    Then centre-crop to `crop_size`, multiply by `rescale_factor`, subtract `mean`, divide by `std`,
    channels first, in `channel_order`.

    crop_offset: how the centre crop's offset (resized - crop) / 2 becomes a whole pixel. transformers' image
    processors floor it; torchvision's `CenterCrop` (timm's eval transform) rounds it, halves to even. The two
    differ by one pixel where (resized - crop) % 4 == 3. Records written before the field existed leave it
    unset: it is read as the rule the resize mode implied then ("squash" floors, "shortest_edge" rounds).
    """

    resize: Literal["squash", "shortest_edge"]
    resize_size: tuple[int, int]
    crop_size: tuple[int, int]
    interpolation: Interpolation
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: Literal["RGB", "BGR"] = "RGB"
    crop_offset: CropOffset = "round"  # never used as such: `_drop_computed` fills an absent one from `resize`

    @computed_field  # type: ignore[prop-decorator]
    @property
    def crop_pct(self) -> float:
        """Fraction of the resized image kept by the centre crop (timm's `crop_pct`)."""
        return round(self.crop_size[0] / self.resize_size[0], 6)

    @model_validator(mode="before")
    @classmethod
    def _drop_computed(cls, data: object) -> object:
        # `crop_pct` is written for readers of the JSON; it is derived, so it is not read back.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "crop_pct"}
            if data.get("crop_offset") is None:  # a record from before the field: the rule its resize implied
                data["crop_offset"] = "floor" if data.get("resize") == "squash" else "round"
        return data

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        if self.resize == "squash" and (
            self.resize_size[0] < self.crop_size[0] or self.resize_size[1] < self.crop_size[1]
        ):
            raise ValueError(f"crop {self.crop_size} is larger than resize {self.resize_size}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self


class GraphFile(_Record):
    file: str = Field(description="path relative to the artifact directory, inside it")
    sha256: str
    outputs: list[str]

    @field_validator("file")
    @classmethod
    def _inside(cls, file: str) -> str:
        # A record names files of its own directory only: never an absolute path or one that climbs out of it.
        path = PurePosixPath(file)
        if not file or "\\" in file or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"graph file {file!r} must be a path inside the artifact directory")
        return file


class Source(_Record):
    framework: Literal["vitserve", "transformers", "timm"]
    model: str = Field(description="model class, hub id or timm model name")
    checkpoint: str | None = Field(default=None, description="file or directory name the weights came from")
    checkpoint_sha256: str | None = None


class Parity(_Record):
    """What the export proved: ONNX against the source framework (a quantized variant: against FP32).

    The logit gate passes when max |diff| <= atol + rtol * max |reference logit| + rounding_factor x the source's own
    float32 rounding (its float32-vs-float64 difference, in `extra`); `tolerance` is that bound as measured.
    """

    reference: str = Field(description="what the outputs were compared against")
    max_abs_logit_diff: float | None = None
    max_abs_attention_diff: float | None = None
    max_abs_relevance_diff: float | None = Field(
        default=None, description="relevance graph vs PyTorch autograd, each map divided by its maximum"
    )
    max_abs_reference_logit: float | None = Field(default=None, description="the output scale rtol multiplies")
    top1_agreement: float | None = None
    tolerance: float | None = Field(default=None, description="the bound max_abs_logit_diff was held to")
    atol: float | None = None
    rtol: float | None = None
    inputs: list[str] = Field(default_factory=list, description="what was fed: random tensors, photos, ...")
    passed: bool
    accuracy: float | None = Field(default=None, description="held-out accuracy, where the export has data")
    reference_accuracy: float | None = None
    accuracy_delta_points: float | None = None
    speedup: float | None = Field(default=None, description="throughput relative to the FP32 artifact")
    extra: dict[str, float] = Field(default_factory=dict)


class Quantization(_Record):
    """How an INT8 artifact was made: what the service must know to keep answers batch-invariant.

    "dynamic" computes activation scales from each run's whole batch, so an image's outputs depend on what it is
    batched with; the service runs such a model one image per run. "static" (QDQ) fixed its scales from
    calibration images at export, so batching cannot change an answer.
    """

    mode: Literal["dynamic", "static"]
    op_types: list[str] = Field(description="ONNX op types quantized; the rest stays float")
    per_channel: bool
    calibration: Calibration | None = None
    calibration_images: int | None = None
    calibration_source: str | None = None


class ArtifactMetadata(_Record):
    format_version: int = FORMAT_VERSION
    name: str
    version: str = "1"
    task: Literal["image-classification"] = "image-classification"
    labels: list[str]
    input_size: tuple[int, int] = Field(description="(height, width) of the model input")
    patch_size: int
    grid: tuple[int, int] = Field(description="(rows, cols) of patch tokens")
    num_layers: int
    num_heads: int
    num_prefix_tokens: int = Field(description="class (and distillation) tokens before the patch tokens")
    precision: Precision = "fp32"
    preprocessing: Preprocessing
    graphs: dict[GraphRole, GraphFile]
    source: Source
    exporter: dict[str, str] = Field(default_factory=dict, description="library versions used to export")
    parity: Parity
    quantization: Quantization | None = None
    extra: dict[str, str | float | int] = Field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def batch_invariant(self) -> bool:
        """Whether batching leaves each image's outputs unchanged. INT8 artifacts written before `quantization`
        was recorded were all dynamically quantized."""
        if self.precision != "int8":
            return True
        return self.quantization is not None and self.quantization.mode == "static"

    @model_validator(mode="after")
    def _check(self) -> ArtifactMetadata:
        h, w = self.input_size
        if (h // self.patch_size, w // self.patch_size) != tuple(self.grid):
            raise ValueError(f"grid {self.grid} does not match input {self.input_size} / patch {self.patch_size}")
        if tuple(self.preprocessing.crop_size) != tuple(self.input_size):
            raise ValueError(f"crop size {self.preprocessing.crop_size} != input size {self.input_size}")
        if not self.labels:
            raise ValueError("labels must not be empty")
        if "classify" not in self.graphs:
            raise ValueError("the artifact has no classify graph")
        return self


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactError(Exception):
    """An artifact directory that cannot be served: says which file and what is wrong."""


def read_metadata(directory: Path, *, verify_hashes: bool = True) -> ArtifactMetadata:
    path = directory / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; export the model with `python -m model_export`")
    try:
        meta = ArtifactMetadata.model_validate_json(path.read_bytes())
    except ValueError as e:
        raise ArtifactError(f"{path}: not a valid vitserve artifact record: {e}") from e
    if meta.format_version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {meta.format_version}, this vitserve reads {FORMAT_VERSION}")
    for role, graph in meta.graphs.items():
        file = directory / graph.file
        if not file.resolve().is_relative_to(directory.resolve()):  # a link that leads out of the directory
            raise ArtifactError(f"{file}: the {role} graph named in {METADATA_FILE} lies outside {directory}")
        if not file.is_file():
            raise ArtifactError(f"{file}: the {role} graph named in {METADATA_FILE} is missing")
        if verify_hashes and sha256_file(file) != graph.sha256:
            raise ArtifactError(f"{file}: sha256 differs from {METADATA_FILE}; the file was changed or truncated")
    return meta


def write_metadata(directory: Path, meta: ArtifactMetadata) -> Path:
    path = directory / METADATA_FILE
    path.write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    return path
