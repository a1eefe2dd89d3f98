"""Reduced-precision variants of an FP32 artifact: INT8 (dynamic quantization, CPU) and FP16 (CUDA).

A variant is an artifact of its own (a sibling directory, its own name) whose parity record compares it with
the FP32 artifact it came from: top-1 agreement and logit difference on the same inputs, the held-out accuracy
delta where the export has labelled data, and the speedup measured side by side in one run.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from vit_artifact.metadata import (
    LOGITS,
    ArtifactMetadata,
    GraphFile,
    Parity,
    read_metadata,
    sha256_file,
    write_metadata,
)

from .sources import ParityError
from .verify import run_in_batches, sample_photos, session

log = logging.getLogger(__name__)

SPEED_BATCH = 8
LOW_TOP1_AGREEMENT = 0.9  # worth a warning; refusal is for a measured accuracy drop (labelled data only)


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # For a graph with ops whose types the quantizer cannot infer (e.g. an ORT-optimized one), it needs a default.
    logging.disable(logging.WARNING)  # the quantizer logs advice and per-tensor notes through the root logger
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=False,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)


def _convert_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def median_batch_seconds(sessions: list[ort.InferenceSession], x: np.ndarray, *, repeats: int = 7) -> list[float]:
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


def make_variant(
    fp32_dir: Path,
    out_dir: Path,
    *,
    precision: str,
    name: str | None = None,
    inputs: np.ndarray | None = None,
    accuracy: Callable[[Path], float] | None = None,  # of a classify graph
    max_accuracy_drop: float = 0.5,
) -> ArtifactMetadata:
    """Write the INT8 or FP16 variant of the artifact in `fp32_dir` to `out_dir` and record how it compares."""
    convert = {"int8": _quantize_int8, "fp16": _convert_fp16}[precision]
    meta = read_metadata(fp32_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp)
        graphs = {}
        for role, graph in meta.graphs.items():
            convert(fp32_dir / graph.file, staging / graph.file)
            graphs[role] = GraphFile(file=graph.file, sha256=sha256_file(staging / graph.file), outputs=graph.outputs)
        parity = _compare(meta, fp32_dir, staging, precision, inputs, accuracy, max_accuracy_drop)
        variant = meta.model_copy(
            update={
                "name": name or out_dir.name,
                "precision": precision,
                "graphs": graphs,
                "parity": parity,
                "extra": {},
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


def _compare(
    meta: ArtifactMetadata,
    fp32_dir: Path,
    variant_dir: Path,
    precision: str,
    inputs: np.ndarray | None,
    accuracy: Callable[[Path], float] | None,
    max_accuracy_drop: float,
) -> Parity:
    classify_file = meta.graphs["classify"].file
    try:
        variant = session(variant_dir / classify_file)
    except Exception as e:  # fp16 kernels may exist only on the CUDA provider
        log.warning("%s variant cannot run on the CPU provider (%s); it is for CUDA and unverified here", precision, e)
        return Parity(reference=f"FP32 artifact {meta.name}", passed=False, inputs=["not run: no CUDA provider"])
    reference = session(fp32_dir / classify_file)
    rng = np.random.default_rng(0)
    x = inputs if inputs is not None else sample_photos(meta.preprocessing)
    if x is None:
        x = rng.standard_normal((SPEED_BATCH, 3, *meta.input_size), dtype=np.float32)
    (ref_logits,) = run_in_batches(reference, x, [LOGITS])
    (var_logits,) = run_in_batches(variant, x, [LOGITS])
    agreement = float(np.mean(ref_logits.argmax(1) == var_logits.argmax(1)))
    speed_x = np.resize(x, (SPEED_BATCH, *x.shape[1:])).astype(np.float32)
    fp32_s, variant_s = median_batch_seconds([reference, variant], speed_x)
    record: dict = dict(
        reference=f"FP32 artifact {meta.name}",
        top1_agreement=agreement,
        speedup=round(fp32_s / variant_s, 3),
        max_abs_logit_diff=float(np.abs(ref_logits - var_logits).max()),
        inputs=[
            f"{len(x)} images through the artifact's preprocessing",
            f"speed: batch {SPEED_BATCH}, median of 7",
        ],
    )
    if accuracy is not None:
        ref_acc, var_acc = accuracy(fp32_dir / classify_file), accuracy(variant_dir / classify_file)
        record.update(
            reference_accuracy=ref_acc,
            accuracy=var_acc,
            accuracy_delta_points=round(100 * (var_acc - ref_acc), 3),
        )
        if 100 * (ref_acc - var_acc) > max_accuracy_drop:
            raise ParityError(
                f"{precision} variant loses {100 * (ref_acc - var_acc):.2f} accuracy points "
                f"(limit {max_accuracy_drop}); keep the FP32 artifact"
            )
    if agreement < LOW_TOP1_AGREEMENT:  # near-tied logits (an untrained head) flip easily; not proof of a fault
        log.warning("%s variant agrees with FP32 on top-1 for only %.1f%% of inputs", precision, 100 * agreement)
    log.info("%s variant: top-1 agreement %.3f, speedup %.2fx", precision, agreement, record["speedup"])
    return Parity(passed=True, **record)
