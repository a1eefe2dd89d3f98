"""Reduced-precision variants of an FP32 artifact: INT8 (CPU) and FP16 (CUDA).

A variant is an artifact of its own (a sibling directory, its own name) whose parity record compares it with
the FP32 artifact it came from. Two separate steps make that record: `measure` runs both on the same inputs
(top-1 agreement, logit difference, and the speedup timed side by side in one run), and `gate` judges the
numbers (the held-out accuracy drop, where the export has labelled data) and raises `ParityError` if the
variant must not ship.

INT8 comes in two kinds (measured on this project's CPU: benchmarks/results/int8.md):
- dynamic (the default): weights INT8 per channel, each run's activation scales computed from its whole
  batch. Fast (1.8-2x FP32 for width 192), but an image's outputs depend on its batch neighbours, so the
  service runs such a model one image per run (`ArtifactMetadata.batch_invariant`).
- static (QDQ, `calibration=`): activation scales fixed from calibration images, so batching changes
  nothing; on onnxruntime's CPU kernels it ran slower than FP32 here, so it is the choice only where
  batching matters more than INT8 speed.
Both quantize only the matrix products with a weight operand (`INT8_OP_TYPES`): the patch-embedding Conv ran
5x slower quantized, and LayerNorm, Softmax, GELU and the attention products stay float. Relevance maps are
FP32-only: a variant carries the classify and attention graphs, not the relevance graph.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from vit_artifact.metadata import (
    INPUT_NAME,
    LOGITS,
    ArtifactMetadata,
    Calibration,
    GraphFile,
    Parity,
    Quantization,
    read_metadata,
    sha256_file,
    write_metadata,
)

from .sources import ParityError
from .verify import run_in_batches, sample_photos, session

log = logging.getLogger(__name__)

SPEED_BATCH = 8
SPEED_REPEATS = 7
CALIBRATION_BATCH = 32
CALIBRATION_PERCENTILE = 99.999
LOW_TOP1_AGREEMENT = 0.9  # worth a warning; refusal is for a measured accuracy drop (labelled data only)
INT8_OP_TYPES = ("MatMul",)


@dataclass(frozen=True)
class CalibrationSet:
    """Images for static INT8, already preprocessed as the artifact says, and where they came from."""

    inputs: np.ndarray  # (N, 3, H, W) float32
    source: str
    method: Calibration = "minmax"


# --- conversion --------------------------------------------------------------------------------------------


def quantize_dynamic_int8(src: Path, dst: Path) -> Quantization:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(INT8_OP_TYPES),
            # for ops whose types the quantizer cannot infer (e.g. an ORT-optimized graph) it needs a default
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return Quantization(mode="dynamic", op_types=list(INT8_OP_TYPES), per_channel=True)


def quantize_static_int8(src: Path, dst: Path, calibration: CalibrationSet) -> Quantization:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    x = calibration.inputs

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._starts = iter(range(0, len(x), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._starts, None)
            if start is None:
                return None
            return {INPUT_NAME: np.ascontiguousarray(x[start : start + CALIBRATION_BATCH], dtype=np.float32)}

    model = onnx.load(str(src))
    weights = {init.name for init in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type in INT8_OP_TYPES and any(i in weights for i in n.input)]
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[calibration.method]
    with _quiet_quantizer():
        quantize_static(
            str(src),
            str(dst),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,  # u8 activations x s8 weights: the x86 kernels' fast pairing
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=method,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "CalibPercentile": CALIBRATION_PERCENTILE},
        )
    return Quantization(
        mode="static",
        op_types=list(INT8_OP_TYPES),
        per_channel=True,
        calibration=calibration.method,
        calibration_images=len(x),
        calibration_source=calibration.source,
    )


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    logging.disable(logging.WARNING)  # the quantizer logs advice and per-tensor notes through the root logger
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _convert_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def _convert(precision: str, src: Path, dst: Path, calibration: CalibrationSet | None) -> Quantization | None:
    if precision == "fp16":
        _convert_fp16(src, dst)
        return None
    if calibration is not None:
        return quantize_static_int8(src, dst, calibration)
    return quantize_dynamic_int8(src, dst)


# --- measuring ---------------------------------------------------------------------------------------------


def median_batch_seconds(
    sessions: list[ort.InferenceSession], x: np.ndarray, *, repeats: int = SPEED_REPEATS
) -> list[float]:
    """Median seconds per run of each session on `x`, interleaved so machine noise hits all alike."""
    feed = {sessions[0].get_inputs()[0].name: x}
    for s in sessions:
        s.run(None, feed)  # warm-up: allocations, thread pool
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@dataclass(frozen=True)
class Measurement:
    """The variant against its FP32 artifact on the same inputs; no verdict."""

    top1_agreement: float
    max_abs_logit_diff: float
    max_abs_reference_logit: float
    speedup: float
    inputs: list[str]
    reference_accuracy: float | None = None
    accuracy: float | None = None


def measure(
    fp32_graph: Path,
    variant_graph: Path,
    x: np.ndarray,
    accuracy: Callable[[Path], float] | None = None,
) -> Measurement:
    reference, variant = session(fp32_graph), session(variant_graph)
    (ref_logits,) = run_in_batches(reference, x, [LOGITS])
    (var_logits,) = run_in_batches(variant, x, [LOGITS])
    speed_x = np.resize(x, (SPEED_BATCH, *x.shape[1:])).astype(np.float32)
    fp32_s, variant_s = median_batch_seconds([reference, variant], speed_x)
    return Measurement(
        top1_agreement=float(np.mean(ref_logits.argmax(1) == var_logits.argmax(1))),
        max_abs_logit_diff=float(np.abs(ref_logits - var_logits).max()),
        max_abs_reference_logit=float(np.abs(ref_logits).max()),
        speedup=round(fp32_s / variant_s, 3),
        inputs=[
            f"{len(x)} images through the artifact's preprocessing",
            f"speed: batch {SPEED_BATCH}, median of {SPEED_REPEATS}",
        ],
        reference_accuracy=accuracy(fp32_graph) if accuracy else None,
        accuracy=accuracy(variant_graph) if accuracy else None,
    )


# --- gating ------------------------------------------------------------------------------------------------


def gate(m: Measurement, *, precision: str, reference: str, max_accuracy_drop: float) -> Parity:
    """The parity record of a measured variant; ParityError where it loses more accuracy than allowed."""
    record: dict = dict(
        reference=reference,
        top1_agreement=m.top1_agreement,
        speedup=m.speedup,
        max_abs_logit_diff=m.max_abs_logit_diff,
        max_abs_reference_logit=m.max_abs_reference_logit,
        inputs=m.inputs,
    )
    if m.accuracy is not None and m.reference_accuracy is not None:
        drop = 100 * (m.reference_accuracy - m.accuracy)
        record.update(
            reference_accuracy=m.reference_accuracy,
            accuracy=m.accuracy,
            accuracy_delta_points=round(-drop, 3),
        )
        if drop > max_accuracy_drop:
            raise ParityError(
                f"{precision} variant loses {drop:.2f} accuracy points (limit {max_accuracy_drop}); keep the FP32 "
                "artifact, or try static INT8 with calibration images like the ones it will serve (--calibration)"
            )
    if m.top1_agreement < LOW_TOP1_AGREEMENT:  # near-tied logits (an untrained head) flip easily; not proof of a fault
        log.warning("%s variant agrees with FP32 on top-1 for only %.1f%% of inputs", precision, 100 * m.top1_agreement)
    log.info("%s variant: top-1 agreement %.3f, speedup %.2fx", precision, m.top1_agreement, m.speedup)
    return Parity(passed=True, **record)


# --- the variant artifact ----------------------------------------------------------------------------------

# The relevance graph is not carried: its backward pass would run through quantized (INT8) or half-precision
# products whose gradients nobody has measured against autograd, so a variant answers relevance requests with a
# 422 pointing at its FP32 artifact.
FP32_ONLY_ROLES = frozenset({"relevance"})
RELEVANCE_NOTE, FP32_ONLY = "relevance", "FP32 only: ask the FP32 artifact this variant was made from"


def make_variant(
    fp32_dir: Path,
    out_dir: Path,
    *,
    precision: str,
    name: str | None = None,
    inputs: np.ndarray | None = None,
    accuracy: Callable[[Path], float] | None = None,  # of a classify graph
    max_accuracy_drop: float = 0.5,
    calibration: CalibrationSet | None = None,  # INT8 only: static (QDQ) quantization instead of dynamic
) -> ArtifactMetadata:
    """Write the INT8 or FP16 variant of the artifact in `fp32_dir` to `out_dir` and record how it compares."""
    meta = read_metadata(fp32_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp)
        graphs = {}
        quantization = None
        for role, graph in meta.graphs.items():
            if role in FP32_ONLY_ROLES:
                continue
            quantization = _convert(precision, fp32_dir / graph.file, staging / graph.file, calibration)
            graphs[role] = GraphFile(file=graph.file, sha256=sha256_file(staging / graph.file), outputs=graph.outputs)
        parity = _parity(meta, fp32_dir, staging, precision, inputs, accuracy, max_accuracy_drop)
        variant = meta.model_copy(
            update={
                "name": name or out_dir.name,
                "precision": precision,
                "graphs": graphs,
                "parity": parity,
                "quantization": quantization,
                "extra": {RELEVANCE_NOTE: FP32_ONLY} if "relevance" in meta.graphs else {},
            }
        )
        variant = ArtifactMetadata.model_validate(variant.model_dump())
        write_metadata(staging, variant)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir()
        for file in staging.iterdir():
            file.replace(out_dir / file.name)
    return variant


def _parity(
    meta: ArtifactMetadata,
    fp32_dir: Path,
    variant_dir: Path,
    precision: str,
    inputs: np.ndarray | None,
    accuracy: Callable[[Path], float] | None,
    max_accuracy_drop: float,
) -> Parity:
    reference = f"FP32 artifact {meta.name}"
    classify_file = meta.graphs["classify"].file
    try:
        session(variant_dir / classify_file)
    except Exception as e:  # fp16 kernels may exist only on the CUDA provider
        log.warning("%s variant cannot run on the CPU provider (%s); it is for CUDA and unverified here", precision, e)
        return Parity(reference=reference, passed=False, inputs=["not run: no CUDA provider"])
    x = inputs if inputs is not None else sample_photos(meta.preprocessing)
    if x is None:
        x = np.random.default_rng(0).standard_normal((SPEED_BATCH, 3, *meta.input_size), dtype=np.float32)
    m = measure(fp32_dir / classify_file, variant_dir / classify_file, x, accuracy)
    return gate(m, precision=precision, reference=reference, max_accuracy_drop=max_accuracy_drop)
