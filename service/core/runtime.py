"""Artifacts loaded into onnxruntime: the model repository and each model's batch-shaped `infer`.

Like a Triton backend, a model is initialised once (sessions built, one warm-up run) and then executes
batches: `infer(pixels (B, 3, H, W), with_attention)` -> logits (B, C) and, when asked, attentions
(B, L, H, N, N); `infer_targets` adds a target class per image and runs those rows on the relevance graph.
Dynamic batching is a scheduling concern above this, not a rewrite of it.

A classify batch runs through onnxruntime's IO binding (`BoundBatch`): the batch's images are copied once, into a
host buffer that stays bound to the session's input, and the logits land in a buffer allocated once. On CUDA,
onnxruntime copies that buffer to the device and the logits back; nothing else is copied or allocated per batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from service.core.graph_rewrite import LAYER_NORM_FUSIONS, rewrite_layer_norms
from vit_artifact.metadata import (
    ATTENTIONS,
    INPUT_NAME,
    LOGITS,
    METADATA_FILE,
    RELEVANCE,
    TARGET_NAME,
    ArtifactError,
    ArtifactMetadata,
    read_metadata,
)
from vit_artifact.serving import SERVING_FILE

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("vitserve.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
SMALL_MODEL_BYTES = 32 * 2**20  # classify graphs under this get one session per CPU by default (session_layout)
CUDA_INSTANCES = 2  # sessions per model on a GPU by default (session_layout says why)
CUDA_MAX_BATCH_SIZE = 64  # images per batch on a GPU unless the settings or serving.json say (provider_batching)
# onnxruntime's CUDA provider, as the service builds its sessions. cuDNN's exhaustive search would time every
# convolution algorithm the first time each input shape runs, and dynamic batching makes every batch size a new
# shape: requests would wait for it long after start. The heuristic picks at once (ViT's one convolution, the
# patch embedding, is a small share of its time).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}
# onnxruntime's element types, as a session's inputs and outputs name them.
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class ProviderError(Exception):
    pass


def resolve_providers(choice: str) -> list[str]:
    """`auto` takes CUDA where onnxruntime-gpu sees a GPU, else CPU; `cuda` without one is an error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "cpu":
        return [CPU]
    if choice == "cuda" and CUDA in available:
        return [CUDA]  # no CPU fallback asked for: `load_model` checks the session really got the GPU
    if CUDA in available:
        return [CUDA, CPU]
    if choice == "cuda":
        raise ProviderError(
            f"VITSERVE_PROVIDER=cuda but onnxruntime offers only {available}; install onnxruntime-gpu and run "
            "on a machine with an NVIDIA GPU, or use VITSERVE_PROVIDER=auto|cpu"
        )
    return [CPU]


def _session(path: Path, providers: list[str], threads: int, cpu_rewrites: bool) -> ort.InferenceSession:
    import onnxruntime as ort  # here, not at the top: an HTTP worker never builds a session (service/procs/worker.py)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # Idle pool threads sleep instead of spinning: the cores are shared with the event loop, the decode threads
    # and the other pool threads, and a spinning thread takes its core from them (benchmarks/serving.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen: list[str | tuple[str, dict[str, str]]] = [(p, CUDA_OPTIONS) if p == CUDA else p for p in providers]
    try:
        rewritten = rewrite_layer_norms(path) if cpu_rewrites and providers == [CPU] else None
        if rewritten is not None:
            return ort.InferenceSession(rewritten, options, providers=chosen, disabled_optimizers=LAYER_NORM_FUSIONS)
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own untyped errors for bad files
        raise ArtifactError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from e


class BoundBatch:
    """A classify session run on a staged input buffer that outlives the batch: through onnxruntime's IO binding
    on a device (`bind`), or by a plain run on the CPU provider, which reads the numpy buffer where it is.

    `run(images)` copies the images into a host buffer of the session's input type (the one copy of a request's
    pixels in the runtime: the rows come straight from the requests, or from the engine's shared slots, in one
    numpy call) and runs the first B rows; bound, the logits go to a buffer bound as the output. On the CPU there
    is no copy to a device to save, and each of the binding's Python calls needs the GIL, which the runtime thread
    waits for while the event loop is busy: a plain run (one call, which reads the buffer where it is) serves there,
    and a batch stacked already runs as it is. Both buffers grow to the
    largest batch seen (a power of two) and are reused after it, so a batch allocates nothing but its answer: a
    fresh (B, 3, H, W) array per batch is a new mapping above glibc's mmap threshold, and its first write pays a
    page fault per 4 KiB (np.stack of 64 ViT-B/16 images: about 9 ms, against 3-4 ms into a buffer written
    before, 2 shared cores). On CUDA onnxruntime copies the bound input to the device and the logits back.

    Not thread-safe: one per session, used by whoever holds that session (`LoadedModel` hands them out).
    """

    def __init__(
        self, session: ort.InferenceSession, classes: int, input_shape: tuple[int, ...], *, bind: bool = True
    ) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.classes = classes
        source = session.get_inputs()[0]
        logits = next((o.type for o in session.get_outputs() if o.name == LOGITS), "")  # none: warm_up says so
        self.input_name = source.name
        self.input_type = NUMPY_TYPES.get(source.type, np.float32)
        self.output_type = NUMPY_TYPES.get(logits, np.float32)
        self.pixels = np.empty((0, *input_shape), self.input_type)
        self.logits = np.empty((0, classes), self.output_type)
        self.runs = 0  # bound runs that succeeded
        self.bind = bind
        self.unbound: str | None = None  # why IO binding was given up, if it was

    def _grow(self, size: int) -> None:
        capacity = 1 << (size - 1).bit_length()
        self.pixels = np.empty((capacity, *self.pixels.shape[1:]), self.input_type)
        self.logits = np.empty((capacity, self.classes), self.output_type)

    def stage(self, images: np.ndarray | Sequence[np.ndarray]) -> int:
        """Copy a batch ((B, 3, H, W), or B images of (3, H, W)) into the input buffer; returns B."""
        size = len(images)
        if size > len(self.pixels):
            self._grow(size)
        if isinstance(images, np.ndarray):
            np.copyto(self.pixels[:size], images, casting="unsafe")
        else:
            np.stack(images, out=self.pixels[:size], casting="unsafe")
        return size

    def run_staged(self, size: int) -> np.ndarray:
        """Run the first `size` staged rows; their logits (size, C), float32, in an array of their own."""
        pixels, logits = self.pixels[:size], self.logits[:size]
        if self.bind and self.unbound is None:
            try:
                self.binding.bind_input(
                    self.input_name, "cpu", 0, self.input_type, list(pixels.shape), pixels.ctypes.data
                )
                self.binding.bind_output(LOGITS, "cpu", 0, self.output_type, list(logits.shape), logits.ctypes.data)
                self.session.run_with_iobinding(self.binding)
                self.runs += 1
                return logits.astype(np.float32)  # a copy: the buffer is the next batch's
            except Exception as e:
                if self.runs:  # binding worked before: this batch's own fault
                    raise
                # A provider whose binding fails from the first run (the CUDA path has not run on every GPU and
                # onnxruntime release this serves): keep serving, through `run` on the same staged buffer.
                self.unbound = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
                log.warning("IO binding failed on %s; running it unbound: %s", self.session.get_providers()[0], e)
        (out,) = self.session.run([LOGITS], {self.input_name: pixels})
        return np.asarray(out, dtype=np.float32)

    def run(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        if not self.bind and isinstance(images, np.ndarray) and images.dtype == self.input_type:
            (out,) = self.session.run([LOGITS], {self.input_name: images})  # read where it is: no copy
            return np.asarray(out, dtype=np.float32)
        return self.run_staged(self.stage(images))


@dataclass
class _Instance:
    """One runnable copy of a model: its sessions, and the classify session's bound buffers."""

    classify: ort.InferenceSession | None
    attention: ort.InferenceSession | None
    relevance: ort.InferenceSession | None
    bound: BoundBatch | None = None


@dataclass
class LoadedModel:
    meta: ArtifactMetadata
    directory: Path
    # None in an HTTP worker of multi-process mode: the sessions live in the engine (service/procs/engine.py).
    classify: ort.InferenceSession | None
    attention: ort.InferenceSession | None
    provider: str
    load_seconds: float
    warmed_up: bool = False
    extra: dict = field(default_factory=dict)
    fingerprint: str = ""  # of the directory when loading began (see `fingerprint`); the reload poll compares it
    # Instances after the first (`classify`, `attention`, `relevance`): (classify, attention, relevance) sessions
    # of their own, so that as many batches can run at once (Triton's instance_group; see `session_layout`).
    spares: list[tuple[ort.InferenceSession, ort.InferenceSession | None, ort.InferenceSession | None]] = field(
        default_factory=list
    )
    relevance: ort.InferenceSession | None = None  # None: an artifact without the relevance graph, or a worker

    def __post_init__(self) -> None:
        self._free: queue.SimpleQueue[_Instance] = queue.SimpleQueue()
        shape = (3, *self.meta.input_size)
        self._instances = [
            _Instance(
                classify,
                attention,
                relevance,
                None
                if classify is None
                else BoundBatch(classify, len(self.meta.labels), shape, bind=self.provider != CPU),
            )
            for classify, attention, relevance in [(self.classify, self.attention, self.relevance), *self.spares]
        ]
        for instance in self._instances:
            self._free.put(instance)

    @property
    def instances(self) -> int:
        """Batches this model can run at once."""
        return 1 + len(self.spares)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def unbound(self) -> list[str]:
        """Why IO binding was given up on a session of this model (`BoundBatch`); empty: every batch ran bound."""
        return [i.bound.unbound for i in self._instances if i.bound is not None and i.bound.unbound]

    @property
    def has_attention(self) -> bool:
        """The artifact has the attention graph (attention maps and the `attentions` output)."""
        return "attention" in self.meta.graphs

    @property
    def has_relevance(self) -> bool:
        """The artifact has the relevance graph (class-specific relevance maps, FP32 artifacts only)."""
        return "relevance" in self.meta.graphs

    def infer(
        self, pixels: np.ndarray | Sequence[np.ndarray], *, with_attention: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one batch, (B, 3, H, W) or B images of (3, H, W), on a free instance (waiting for one if all are
        busy). The logits (B, C) and attentions are arrays of their own. Thread-safe."""
        instance = self._free.get()
        try:
            return self._run(instance, pixels, with_attention)
        finally:
            self._free.put(instance)

    def infer_targets(
        self, images: np.ndarray | Sequence[np.ndarray], targets: Sequence[int | None], *, with_attention: bool
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """A batch where the rows with a target class (-1: the top prediction) want a relevance map: those rows
        run on the relevance graph in one call, the others (None) as `infer` runs them, on the same instance.
        Logits (B, C); attentions (B, L, H, N, N) when asked (zeros in relevance rows); raw relevance maps
        (B, grid_h, grid_w) (zeros in the other rows). Thread-safe."""
        wanted = [i for i, t in enumerate(targets) if t is not None]
        others = [i for i, t in enumerate(targets) if t is None]
        instance = self._free.get()
        try:
            if instance.relevance is None:
                raise ArtifactError(f"model {self.name} has no relevance graph")
            feed = {
                INPUT_NAME: np.ascontiguousarray(np.stack([images[i] for i in wanted]), dtype=np.float32),
                TARGET_NAME: np.array([targets[i] for i in wanted], dtype=np.int64),
            }
            logits_r, maps = instance.relevance.run([LOGITS, RELEVANCE], feed)
            if not others:
                return logits_r, None, maps
            logits_o, attentions_o = self._run(instance, [images[i] for i in others], with_attention)
        finally:
            self._free.put(instance)
        logits = np.empty((len(targets), logits_r.shape[1]), np.float32)
        logits[wanted], logits[others] = logits_r, logits_o
        relevance = np.zeros((len(targets), *maps.shape[1:]), np.float32)
        relevance[wanted] = maps
        attentions = None
        if attentions_o is not None:
            attentions = np.zeros((len(targets), *attentions_o.shape[1:]), np.float32)
            attentions[others] = attentions_o
        return logits, attentions, relevance

    def _run(
        self, instance: _Instance, pixels: np.ndarray | Sequence[np.ndarray], with_attention: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if with_attention:
            if instance.attention is None:
                raise ArtifactError(f"model {self.name} has no attention graph")
            batch = pixels if isinstance(pixels, np.ndarray) else np.stack(pixels)
            feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
            logits, attentions = instance.attention.run([LOGITS, ATTENTIONS], feed)
            return logits, attentions
        assert instance.bound is not None, "an HTTP worker's model runs in the engine"
        return instance.bound.run(pixels), None

    def warm_up(self) -> None:
        x = np.zeros((1, 3, *self.meta.input_size), np.float32)
        assert self.classify is not None, "an HTTP worker's model runs in the engine"
        # Unbound first: a graph whose logits disagree with the labels is reported as such, not as a binding error.
        (logits,) = self.classify.run([LOGITS], {INPUT_NAME: x})
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
        if self.relevance is not None:
            _, _, maps = self.infer_targets([x[0]], [-1], with_attention=False)
            if maps.shape != (1, *self.meta.grid):
                raise ArtifactError(
                    f"model {self.name}: relevance output {maps.shape} does not match the grid {self.meta.grid}"
                )
        for _ in range(self.instances):  # the first run of each session and binding is slow: not a client's
            self.infer(x, with_attention=False)
        self.warmed_up = True


def session_layout(
    instances: int, threads: int, *, providers: list[str], weight_bytes: int, cpus: int
) -> tuple[int, int]:
    """(sessions, intra-op threads each) for a model: VITSERVE_INSTANCES and VITSERVE_THREADS, 0 meaning auto.

    Auto instances: on the CPU provider, a model under SMALL_MODEL_BYTES of weights gets one single-threaded
    session per CPU, each running its own batch: its operators are too small for onnxruntime to split across
    threads at a gain (the default model at batch 16: 0.93 ms of CPU per image on one two-thread session, 0.77
    on two one-thread sessions side by side, in-process; and through the server 1.3x the images per second for
    pixel tensors, see README "Benchmarks"). Larger models get one session: their operators split well, and one
    batch runs in the time N would. A GPU gets CUDA_INSTANCES (2): still one big batch at a time on the device,
    but while one session's batch computes, the other's is copied into its buffer and across to the device (64
    ViT-B/16 images are 38 MB: a few ms each way, against a batch's 15-25 ms of compute), and the runner's turn
    on the event loop between batches is hidden too. Auto threads: the CPUs shared out among the sessions
    (onnxruntime's own choice when there is one session)."""
    if instances == 0:
        small = providers == [CPU] and weight_bytes < SMALL_MODEL_BYTES
        instances = max(1, cpus) if small else CUDA_INSTANCES if CUDA in providers else 1
    if threads == 0 and instances > 1:
        threads = max(1, cpus // instances)
    return instances, threads


def provider_batching(provider: str, explicit: set[str]) -> dict[str, int]:
    """The batching a provider wants for the settings an operator left unset (`explicit`: those set): on CUDA,
    batches of up to CUDA_MAX_BATCH_SIZE, since a GPU's images/s keep rising with the batch well past the CPU
    default of 16 (it is one of few devices, not one of many cores). An artifact's serving.json overrides this
    (`service.core.state.batch_policy`), as it does the settings."""
    if provider == CUDA and "max_batch_size" not in explicit:
        return {"max_batch_size": CUDA_MAX_BATCH_SIZE}
    return {}


def load_model(
    directory: Path, *, providers: list[str], threads: int, cpu_rewrites: bool, instances: int = 1, cpus: int = 1
) -> LoadedModel:
    """Load and warm up one artifact. `cpu_rewrites`: service.core.graph_rewrite's rewrites on the CPU provider
    (VITSERVE_CPU_GRAPH_REWRITES); `instances`, `threads`: as `session_layout` takes them (0: auto)."""
    started = time.perf_counter()
    seen = fingerprint(directory)  # before reading: a change made while loading shows up at the next poll
    meta = read_metadata(directory)
    if meta.name != directory.name:
        log.warning("artifact in %s is named %r; serving it as %r", directory, meta.name, directory.name)
        meta = meta.model_copy(update={"name": directory.name})
    classify_path = directory / meta.graphs["classify"].file
    instances, threads = session_layout(
        instances, threads, providers=providers, weight_bytes=classify_path.stat().st_size, cpus=cpus
    )
    graph = meta.graphs.get("attention")
    relevance_graph = meta.graphs.get("relevance")
    sessions = []
    for _ in range(instances):
        classify = _session(classify_path, providers, threads, cpu_rewrites)
        attention = _session(directory / graph.file, providers, threads, cpu_rewrites) if graph else None
        # the LayerNorm rewrites match the TorchScript exporter's graphs, not this one (a dynamo export)
        relevance = _session(directory / relevance_graph.file, providers, threads, False) if relevance_graph else None
        sessions.append((classify, attention, relevance))
    classify, attention, relevance = sessions[0]
    provider = classify.get_providers()[0]
    if providers == [CUDA] and provider != CUDA:
        # onnxruntime-gpu lists CUDA whenever it is installed, and falls back to the CPU when no GPU is usable.
        raise ProviderError(
            f"VITSERVE_PROVIDER=cuda but onnxruntime could not use a GPU for {meta.name} (it fell back to "
            f"{provider}); check the NVIDIA driver and CUDA_VISIBLE_DEVICES, or use VITSERVE_PROVIDER=auto|cpu"
        )
    model = LoadedModel(
        meta=meta,
        directory=directory,
        classify=classify,
        attention=attention,
        relevance=relevance,
        provider=provider,
        load_seconds=0.0,
        fingerprint=seen,
        spares=sessions[1:],
    )
    try:
        model.warm_up()
    except ArtifactError:
        raise
    except Exception as e:  # onnxruntime refuses the input the metadata describes: the two disagree
        shape = (1, 3, *meta.input_size)
        raise ArtifactError(
            f"model {meta.name}: the graphs do not take the input {artifact_path(directory)} describes, {shape}: "
            f"{str(e).splitlines()[0][:300]}"
        ) from e
    model.load_seconds = time.perf_counter() - started
    log.info(
        "loaded %s (%s, %s, %d instance%s of %s thread%s) in %.2f s",
        meta.name,
        meta.precision,
        provider,
        instances,
        "" if instances == 1 else "s",
        threads or "onnxruntime's choice of",
        "" if threads == 1 else "s",
        model.load_seconds,
    )
    return model


def artifact_path(directory: Path) -> Path:
    return directory / METADATA_FILE


def fingerprint(directory: Path) -> str:
    """What the reload poll compares: the bytes of artifact.json and serving.json, and every file's name, size
    and modification time (so a graph still being copied changes it too). Empty if the directory is in flux."""
    digest = hashlib.sha256()
    try:
        for path in sorted(directory.iterdir()):
            if not path.is_file():
                continue
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            if path.name in (METADATA_FILE, SERVING_FILE):
                digest.update(path.read_bytes())
    except OSError:
        return ""
    return digest.hexdigest()


def public_message(error: Exception, directory: Path) -> str:
    """An artifact error as clients may see it: paths relative to the model repository, never the server's."""
    message = str(error)
    for prefix in {str(directory), str(directory.resolve())}:
        message = message.replace(prefix + os.sep, directory.name + "/")
    return message


def discover(model_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Artifact directories in the repository: sub-directories holding an `artifact.json`. Hidden ones
    (`.name`) are skipped: that is where a new version is written before it is renamed into place."""
    found = sorted(
        p for p in model_dir.iterdir() if not p.name.startswith(".") and p.is_dir() and (p / METADATA_FILE).is_file()
    )
    if only is not None:
        names = {p.name for p in found}
        missing = [n for n in only if n not in names]
        if missing:
            raise ArtifactError(f"models {missing} are not in {model_dir} (found: {sorted(names)})")
        found = [p for p in found if p.name in only]
    return found


EMBEDDED_MODEL = "digits-vit"  # the model trained here (models/digits-vit): the default when none is named


def choose_default(names: list[str], default: str | None) -> str:
    """The model the routes without a name use: `default` (VITSERVE_DEFAULT_MODEL) when it is set; unset, the
    repository's only model, or else the embedded one. A name that is not served stops the start, saying which
    setting names it and what may be named."""
    if not default and len(names) == 1:
        return names[0]
    chosen = default or EMBEDDED_MODEL
    if chosen in names:
        return chosen
    source = "VITSERVE_DEFAULT_MODEL" if default else "VITSERVE_DEFAULT_MODEL is unset"
    raise ArtifactError(
        f"default model {chosen!r} ({source}) is not among the models {sorted(names)}: set VITSERVE_DEFAULT_MODEL "
        "to the one the routes without a model name should use"
    )


@dataclass(frozen=True)
class LoadFailure:
    """A model that could not be loaded (VITSERVE_ON_MODEL_ERROR=skip): why, as clients may read it."""

    error: str
    fingerprint: str


class ModelRepository:
    """Every model in the model directory, by name; with `on_error="skip"`, also those that failed to load."""

    def __init__(
        self, models: dict[str, LoadedModel], default: str, unavailable: dict[str, LoadFailure] | None = None
    ) -> None:
        self.models = models
        self.default = default
        self.unavailable = unavailable or {}

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        default: str | None,
        providers: list[str],
        threads: int,
        cpu_rewrites: bool,
        instances: int = 1,
        cpus: int = 1,
        only: list[str] | None = None,
        on_error: Literal["fail", "skip"] = "fail",
    ) -> ModelRepository:
        """Load every artifact. A failure stops the start, unless `on_error="skip"` and it is not the default
        model (`choose_default`): then that model is listed as unavailable and the others are served."""
        paths = discover(model_dir, only)
        if not paths:
            raise ArtifactError(f"no artifacts in {model_dir}; export one with `python -m model_export`")
        default = choose_default([p.name for p in paths], default)
        models: dict[str, LoadedModel] = {}
        unavailable: dict[str, LoadFailure] = {}
        for path in paths:
            seen = fingerprint(path)
            try:
                models[path.name] = load_model(
                    path,
                    providers=providers,
                    threads=threads,
                    cpu_rewrites=cpu_rewrites,
                    instances=instances,
                    cpus=cpus,
                )
            except ArtifactError as e:
                if on_error == "fail":
                    raise
                if path.name == default:
                    raise ArtifactError(
                        f"{e} (the default model must load, even with VITSERVE_ON_MODEL_ERROR=skip)"
                    ) from e
                log.error("model %s is unavailable, serving the others: %s", path.name, e)
                unavailable[path.name] = LoadFailure(public_message(e, path), seen)
        return cls(models, default, unavailable)

    def get(self, name: str | None) -> LoadedModel | None:
        return self.models.get(name or self.default)

    @property
    def ready(self) -> bool:
        return all(m.warmed_up for m in self.models.values())
