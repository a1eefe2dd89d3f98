"""Artifacts loaded into onnxruntime: the model repository and each model's batch-shaped `infer`.

Like a Triton backend, a model is initialised once (sessions built, one warm-up run) and then executes
batches: `infer(pixels (B, 3, H, W), with_attention)` -> logits (B, C) and, when asked, attentions
(B, L, H, N, N). Dynamic batching is a scheduling concern above this, not a rewrite of it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.artifact import (
    ATTENTIONS,
    INPUT_NAME,
    LOGITS,
    METADATA_FILE,
    ArtifactError,
    ArtifactMetadata,
    read_metadata,
)

log = logging.getLogger("vitserve.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(Exception):
    pass


def resolve_providers(choice: str) -> list[str]:
    """`auto` takes CUDA where onnxruntime-gpu sees a GPU, else CPU; `cuda` without one is an error."""
    available = ort.get_available_providers()
    if choice == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if choice == "cuda":
        raise ProviderError(
            f"VITSERVE_PROVIDER=cuda but onnxruntime offers only {available}; install onnxruntime-gpu and run "
            "on a machine with an NVIDIA GPU, or use VITSERVE_PROVIDER=auto|cpu"
        )
    return [CPU]


def _session(path: Path, providers: list[str], threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for bad files
        raise ArtifactError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from e


@dataclass
class LoadedModel:
    meta: ArtifactMetadata
    directory: Path
    classify: ort.InferenceSession
    attention: ort.InferenceSession | None
    provider: str
    load_seconds: float
    warmed_up: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.meta.name

    def infer(self, pixels: np.ndarray, *, with_attention: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one batch. Thread-safe: onnxruntime sessions may be run concurrently."""
        feed = {INPUT_NAME: np.ascontiguousarray(pixels, dtype=np.float32)}
        if with_attention:
            if self.attention is None:
                raise ArtifactError(f"model {self.name} has no attention graph")
            logits, attentions = self.attention.run([LOGITS, ATTENTIONS], feed)
            return logits, attentions
        (logits,) = self.classify.run([LOGITS], feed)
        return logits, None

    def warm_up(self) -> None:
        x = np.zeros((1, 3, *self.meta.input_size), np.float32)
        logits, _ = self.infer(x, with_attention=False)
        if logits.shape != (1, len(self.meta.labels)):
            raise ArtifactError(
                f"model {self.name}: the classify graph gives logits of shape {logits.shape}, but the artifact "
                f"lists {len(self.meta.labels)} labels"
            )
        if self.attention is not None:
            _, att = self.infer(x, with_attention=True)
            want = (1, self.meta.num_layers, self.meta.num_heads, self.meta.num_tokens, self.meta.num_tokens)
            if att is None or att.shape != want:
                shape = None if att is None else att.shape
                raise ArtifactError(f"model {self.name}: attention output {shape} does not match the metadata {want}")
        self.warmed_up = True


def load_model(directory: Path, *, providers: list[str], threads: int) -> LoadedModel:
    started = time.perf_counter()
    meta = read_metadata(directory)
    if meta.name != directory.name:
        log.warning("artifact in %s is named %r; serving it as %r", directory, meta.name, directory.name)
        meta = meta.model_copy(update={"name": directory.name})
    classify = _session(directory / meta.graphs["classify"].file, providers, threads)
    graph = meta.graphs.get("attention")
    attention = _session(directory / graph.file, providers, threads) if graph else None
    provider = classify.get_providers()[0]
    model = LoadedModel(
        meta=meta,
        directory=directory,
        classify=classify,
        attention=attention,
        provider=provider,
        load_seconds=0.0,
    )
    model.warm_up()
    model.load_seconds = time.perf_counter() - started
    log.info("loaded %s (%s, %s) in %.2f s", meta.name, meta.precision, provider, model.load_seconds)
    return model


def discover(model_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Artifact directories in the repository: sub-directories holding an `artifact.json`."""
    found = sorted(p for p in model_dir.iterdir() if p.is_dir() and (p / METADATA_FILE).is_file())
    if only is not None:
        names = {p.name for p in found}
        missing = [n for n in only if n not in names]
        if missing:
            raise ArtifactError(f"models {missing} are not in {model_dir} (found: {sorted(names)})")
        found = [p for p in found if p.name in only]
    return found


class ModelRepository:
    """Every model in the model directory, by name."""

    def __init__(self, models: dict[str, LoadedModel], default: str) -> None:
        self.models = models
        self.default = default

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        default: str,
        providers: list[str],
        threads: int,
        only: list[str] | None = None,
    ) -> ModelRepository:
        paths = discover(model_dir, only)
        if not paths:
            raise ArtifactError(f"no artifacts in {model_dir}; export one with `python -m model_export`")
        models = {p.name: load_model(p, providers=providers, threads=threads) for p in paths}
        if default not in models:
            raise ArtifactError(f"default model {default!r} is not among the loaded models {sorted(models)}")
        return cls(models, default)

    def get(self, name: str | None) -> LoadedModel | None:
        return self.models.get(name or self.default)

    @property
    def ready(self) -> bool:
        return all(m.warmed_up for m in self.models.values())
