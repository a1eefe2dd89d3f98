"""All configuration: one `BaseSettings`, read from `VITSERVE_*` environment variables, validated at start."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.json_schema import JsonDict
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.route_table import OPEN

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
# Probes, scrapes and the demo page's own files always answer without a key (an orchestrator's probe carries
# none); the page's API calls still need one. VITSERVE_OPEN_ROUTES adds to these, never replaces them.
DEFAULT_OPEN_ROUTES = OPEN  # the routes declared open in service.route_table

# A comma-separated environment value ("a,b"); a JSON list is accepted too.
CommaList = Annotated[list[str], NoDecode]


def _shown(text: str) -> JsonDict:
    """How the configuration table shows a default that reads badly as a value."""
    return {"shown_default": text}


def _split(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITSERVE_", protected_namespaces=(), extra="ignore")

    model_dir: Path = Field(
        REPO_MODELS,
        description="model repository: one sub-directory per artifact (Triton-style)",
        json_schema_extra=_shown("`models/`"),
    )
    default_model: str | None = Field(
        None,
        description="model for the routes without a name; when unset and the repository holds one model, that model",
        json_schema_extra=_shown("`digits-vit`"),  # service.core.runtime.EMBEDDED_MODEL
    )
    models: list[str] | None = Field(
        None, description="JSON list of model names to load", json_schema_extra=_shown("all")
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    grpc_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol over gRPC (`GRPCInferenceService`), on `VITSERVE_HOST`; "
        "0: off (docs/v2.md, gRPC, says why; Triton's convention is 8001)",
        json_schema_extra=_shown("0 (off)"),
    )
    grpc_stubs_dir: Path | None = Field(
        None,
        description="where the gRPC stubs are generated (once per protobuf version) and looked for; the image "
        "sets it to stubs generated at build time, as its root filesystem is read-only",
        json_schema_extra=_shown("`$XDG_CACHE_HOME/vitserve/grpc-stubs`, else a temporary directory"),
    )
    workers: int = Field(
        1,
        ge=0,
        description="HTTP worker processes (parse, decode, preprocess, encode) in front of one inference engine "
        "process that batches for all of them; 1: one process does everything; 0: one per CPU this process may "
        "use (cgroup-aware)",
    )
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="`auto` (CUDA where `onnxruntime-gpu` sees a GPU, else CPU), `cpu`, `cuda` (fails at start "
        "without a GPU)",
    )
    threads: int = Field(
        0,
        ge=0,
        description="onnxruntime intra-op threads per session (0: the CPUs shared out among a model's instances; "
        "onnxruntime's choice for one)",
    )
    instances: int = Field(
        0,
        ge=0,
        description="onnxruntime sessions per model, each running its own batch at once (Triton's instance_group "
        "count); 0: one single-threaded session per CPU for a classify graph under 32 MB on the CPU provider, two "
        "on CUDA (one batch computes while the next is copied in), else one (`service.core.runtime.session_layout`)",
    )
    cpu_graph_rewrites: bool = Field(
        True,
        description="on the CPU provider, load graphs with layer normalization written as primitive ops "
        "(`service/core/graph_rewrite.py`: 13-18% less CPU per image for the default model, neutral for ViT-B/16)",
    )
    max_body_bytes: int = Field(
        20 * 2**20, gt=0, description="request body limit: 413 while reading", json_schema_extra=_shown("20 MiB")
    )
    max_pixels: int = Field(
        40_000_000, gt=0, description="decoded image size limit: 413 from the header, before decoding"
    )
    jpeg_draft: bool = Field(
        True,
        description="decode a large JPEG at 1/2, 1/4 or 1/8 scale inside libjpeg (DCT scaling), never below the "
        "model's resize: a 4 MP photo is decoded and preprocessed about 3x faster, and the model input moves by "
        "0.1-2.2/255 on average, at most 56/255 (sharp edges), against a full decode; `false`: always decode at "
        "full resolution, the pixels the model's framework gets from its own decode",
    )
    max_batch_files: int = Field(
        32,
        gt=0,
        description="images per batch request, and per V2 request (`image` or `pixel_values` N): 413 beyond; at "
        "most `VITSERVE_MAX_QUEUE_SIZE`",
    )
    batching: bool = Field(True, description="dynamic batching: coalesce concurrent requests into one runtime call")
    max_batch_size: int = Field(
        16,
        gt=0,
        description="images per runtime call (a model's `serving.json` may override); unset, a model on CUDA takes "
        "up to 64 (`service.core.runtime.provider_batching`)",
    )
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0,
        description="longest the first request of a batch waits for others (0: none; a batch is what queued while "
        "the previous one ran; benchmarks/README.md measures why)",
    )
    max_queue_size: int = Field(
        256,
        gt=0,
        description="queued images per model before 503 + `Retry-After` (a request of N images needs N places free)",
    )
    admission: Literal["adaptive", "queue"] = Field(
        "adaptive",
        description="`adaptive`: refuse at once (503 + `Retry-After`) a request the server predicts it cannot answer "
        "within `VITSERVE_LATENCY_BUDGET_MS`, from the queue ahead of it and each batch size's measured time, and "
        "limit inference requests in progress in each HTTP process when their answers take longer than that "
        "(docs/operations.md: Dynamic batching); `queue`: admit until the queue or `VITSERVE_MAX_CONCURRENT_REQUESTS` is full, "
        "which stay hard caps either way",
    )
    latency_budget_ms: float = Field(
        1000.0,
        gt=0,
        description="the longest a request should take from its complete body to its answer: past it, adaptive "
        "admission refuses what would wait longer (a request that would start within one full batch is never "
        "refused for it). A model's `serving.json` may override it. Lower it for a strict latency target (docs/operations.md: "
        "Dynamic batching)",
    )
    admission_tolerance: float = Field(
        1.5,
        gt=1.0,
        description="adaptive admission's target for a route whose unloaded time is near the latency budget (an "
        "attention map of many images on a slow model): this multiple of its unloaded time, where that is longer "
        "than the budget",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="longest a request waits to be served (503 after)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="`debug`, `info`, `warning`, `error`"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`text`: one line per record for people; `json`: one JSON object per line (time, level, "
        "logger, message, request_id, process; the access log's client, method, path, status as fields) for log "
        "pipelines",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector (`http://collector:4318`; `/v1/traces` is added): send an OpenTelemetry "
        "span per request with one per stage. Unset: OpenTelemetry's own `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or "
        "`OTEL_EXPORTER_OTLP_ENDPOINT` turns tracing on; with none of them, tracing is off and costs nothing",
        json_schema_extra=_shown("none (off)"),
    )

    # Security. Keys are never logged: `repr=False` keeps them out of the settings' repr and error messages.
    api_keys: CommaList = Field(
        default_factory=list,
        repr=False,
        description="comma-separated API keys; when any is set, every route except the open ones needs "
        "`Authorization: Bearer <key>` or `X-API-Key: <key>`",
    )
    api_keys_file: Path | None = Field(
        None,
        description="a file of keys, one a line (`#` comments), added to `VITSERVE_API_KEYS`: mount a Kubernetes "
        "Secret here",
    )
    admin_keys: CommaList = Field(
        default_factory=list,
        repr=False,
        description="comma-separated admin keys for the V2 model repository extension (`/v2/repository/...`: index, "
        "load, unload), sent like API keys; API keys do not open it; unset: those routes answer 403",
        json_schema_extra=_shown("none (repository extension off)"),
    )
    # Read as the extra routes; held as every open route (the defaults first), which is what the checks use.
    open_routes: CommaList = Field(
        default_factory=list,
        validate_default=True,
        description="routes answered without a key besides those always open ("
        + ", ".join(f"`{route}`" for route in DEFAULT_OPEN_ROUTES)
        + "): `/docs,/openapi.json` publishes the API's documentation; `/prefix/*` matches below the prefix",
    )
    cors_origins: CommaList = Field(
        default_factory=list,
        description="origins whose pages may call the API (`https://a.example,https://b.example`, or `*`)",
        json_schema_extra=_shown("none (closed)"),
    )
    direct_infer: bool = Field(
        True,
        description="answer V2 `infer` and `/v1/classify` requests with bodies up to 1 MiB from the connection "
        "layer, past ASGI (same rules and answers, about half the event loop's cost); off while CORS or tracing is on",
    )
    max_concurrent_requests: int = Field(
        256,
        gt=0,
        description="inference requests (every POST under `/v1` and `/v2`) in progress at once; beyond it 503 + "
        "`Retry-After` at once",
    )

    # Slow clients and memory (docs/operations.md: Reliability).
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must be complete this long after its first byte: 408 after"
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="an inference request's body must arrive within this long plus its size at "
        "`VITSERVE_BODY_MIN_RATE`: 408 after",
    )
    body_min_rate: int = Field(
        64 * 1024,
        gt=0,
        description="bytes/s an upload must keep up, after `VITSERVE_BODY_TIMEOUT_S`",
        json_schema_extra=_shown("64 KiB/s"),
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(
        1000,
        gt=0,
        description="open connections; past it the oldest idle or header-sending one is closed to make room, or "
        "503 when none is (also kept below the file-descriptor limit)",
    )
    body_budget_bytes: int = Field(
        192 * 2**20,
        gt=0,
        description="request bodies of inference requests in flight, server-wide; beyond it a request waits up "
        "to 1 s, then 503",
        json_schema_extra=_shown("192 MiB"),
    )
    decode_budget_bytes: int = Field(
        448 * 2**20,
        gt=0,
        description="decoded images in flight (pixels x bytes per pixel of the file's mode, plus the RGB copy), "
        "server-wide; beyond it a request waits up to 1 s, then 503",
        json_schema_extra=_shown("448 MiB"),
    )
    max_response_bytes: int = Field(
        32 * 2**20,
        gt=0,
        description="a V2 response larger than this is refused (413) before any inference: ask for fewer images, "
        "binary outputs or maps instead of raw attentions",
        json_schema_extra=_shown("32 MiB"),
    )

    # Triton's system shared memory extension (service/v2/shared_memory.py).
    system_shared_memory: bool = Field(
        False,
        description="Triton's system shared memory extension (`/v2/systemsharedmemory`; V2 inputs and outputs by "
        "region): any client that may call the API can then read and write the POSIX shared memory objects under "
        "/dev/shm that the server's user may open, so turn it on only for trusted clients on the same host "
        "(docs/v2.md: System shared memory); off: 403",
    )
    system_shared_memory_max_regions: int = Field(
        64, gt=0, description="registered shared memory regions, server-wide; registering more is a 400"
    )

    # Reliability.
    on_model_error: Literal["fail", "skip"] = Field(
        "fail",
        description="a model that fails to load: `fail` the start, or `skip` it and serve the others (the default "
        "model must always load)",
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="on SIGTERM, readiness turns 503 at once and requests are still served this long before the "
        "listener closes",
    )
    exit_with_parent: bool = Field(
        False,
        description="shut down (draining, as on SIGTERM) when the process that started the server exits; "
        "`make serve` sets it, so a supervisor that signals only `make` still stops the server",
    )
    reload_interval_s: float = Field(
        0.0,
        ge=0,
        description="poll the model directory this often for new versions and new models",
        json_schema_extra=_shown("0 (off)"),
    )

    @property
    def worker_count(self) -> int:
        """`workers`, with 0 resolved to the CPUs this process may use."""
        return self.workers or usable_cpus()

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model directory {value} does not exist; set VITSERVE_MODEL_DIR")
        return value

    @field_validator("api_keys", "admin_keys", "open_routes", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value)

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _keys_are_header_safe(cls, value: list[str]) -> list[str]:
        for key in value:
            _check_key(key)
        return value

    @field_validator("open_routes")
    @classmethod
    def _open_routes_add_to_the_defaults(cls, value: list[str]) -> list[str]:
        for route in value:
            if not route.startswith("/") or "*" in route[:-1]:
                raise ValueError(f"open route {route!r} must be a path (`/metrics`) or a prefix (`/v2/health/*`)")
        return [*DEFAULT_OPEN_ROUTES, *(route for route in dict.fromkeys(value) if route not in DEFAULT_OPEN_ROUTES)]

    @model_validator(mode="after")
    def _batch_fits_the_queue(self) -> Settings:
        # Each image of a batch request takes a queue slot: a batch larger than the queue could never be served.
        if self.max_batch_files > self.max_queue_size:
            raise ValueError(
                f"VITSERVE_MAX_BATCH_FILES ({self.max_batch_files}) exceeds VITSERVE_MAX_QUEUE_SIZE "
                f"({self.max_queue_size}); a full batch request could never be queued"
            )
        return self

    @model_validator(mode="after")
    def _read_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            path = self.api_keys_file
            try:
                lines = path.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"cannot read the API keys file {path}: {e.strerror}") from None
            keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not keys:
                raise ValueError(f"the API keys file {path} holds no keys")
            for key in keys:
                _check_key(key)
            self.api_keys = [*self.api_keys, *keys]
        return self


def _check_key(key: str) -> None:
    # Printable ASCII without spaces or commas: sendable in a header and unambiguous in a list. The key itself is
    # never quoted in the message.
    if not key or not all(33 <= ord(c) < 127 and c != "," for c in key):
        raise ValueError("an API key must be printable ASCII without spaces or commas")


def settings_table() -> str:
    """The configuration table of docs/operations.md, made from the fields above (tests/service/test_settings_doc.py checks it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        shown = extra.get("shown_default")
        if shown is None:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, bool):
                shown = f"`{str(default).lower()}`"
            elif isinstance(default, list):
                shown = f"`{','.join(default)}`" if default else "none"
            elif default is None:
                shown = "none"
            elif isinstance(default, int | float):
                shown = (
                    f"{default:g}"
                    if isinstance(default, float)
                    else f"{default:,}"
                    if default >= 10_000
                    else str(default)
                )
            else:
                shown = f"`{default}`"
        rows.append(f"| `VITSERVE_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows) + "\n"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, bounded by a cgroup v2 CPU quota (a container's CPU limit)."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count
