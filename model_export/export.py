"""Trace an `ExportSource` into the artifact's ONNX graphs, verify them, and write the metadata record.

Graph design (why two): ViT-B/16 at batch 8 has 8 x 12 x 12 x 197 x 197 attention probabilities, 179 MB,
that the classify path does not need. The classify graph (`model.onnx`) is traced with the attention output
dropped, so it is exactly a logits-only export (onnxruntime optimises it at load); the attention graph
(`attention.onnx`) also returns the probabilities. Measured (benchmarks/attention_cost.py): an offline pass of
onnxruntime's transformer optimizer made the classify graph 6% slower than the plain export, so there is none. A mixed batch of
classify and attention requests runs on the attention graph (it returns logits too). The relevance graph
(`relevance.onnx`) takes a target class per image besides the pixels and runs a backward pass inside the graph
(`model_export/relevance.py`), so it costs a classify about three times over and is its own third graph.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from vit_artifact.metadata import (
    ATTENTIONS,
    INPUT_NAME,
    LOGITS,
    RELEVANCE,
    ArtifactMetadata,
    GraphFile,
    Parity,
    Precision,
    sha256_file,
    write_metadata,
)

from .relevance import RELEVANCE_FILE, export_relevance
from .sources import DEFAULT_TOLERANCE, ExportSource, LogitsOnly, Tolerance

log = logging.getLogger(__name__)

CLASSIFY_FILE = "model.onnx"
ATTENTION_FILE = "attention.onnx"
TRACE_BATCH = 2  # verification uses another batch size, proving the batch axis is really dynamic
DEFAULT_OPSET = 17


def _trace(module: torch.nn.Module, dummy: torch.Tensor, path: Path, outputs: list[str], opset: int) -> None:
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape math are expected
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))


def export_graphs(src: ExportSource, out_dir: Path, *, opset: int = DEFAULT_OPSET) -> dict[str, GraphFile]:
    out_dir.mkdir(parents=True, exist_ok=True)
    dummy = torch.randn(TRACE_BATCH, 3, *src.input_size, generator=torch.Generator().manual_seed(0))
    src.model.eval()
    with torch.no_grad(), src.patches():
        _trace(LogitsOnly(src.model), dummy, out_dir / CLASSIFY_FILE, [LOGITS], opset)
        _trace(src.model, dummy, out_dir / ATTENTION_FILE, [LOGITS, ATTENTIONS], opset)
    return {
        "classify": GraphFile(file=CLASSIFY_FILE, sha256=sha256_file(out_dir / CLASSIFY_FILE), outputs=[LOGITS]),
        "attention": GraphFile(
            file=ATTENTION_FILE, sha256=sha256_file(out_dir / ATTENTION_FILE), outputs=[LOGITS, ATTENTIONS]
        ),
        "relevance": export_relevance_graph(src, out_dir, opset=opset),
    }


def export_relevance_graph(src: ExportSource, out_dir: Path, *, opset: int = DEFAULT_OPSET) -> GraphFile:
    """The relevance graph (`model_export/relevance.py`): forward and backward pass traced into one graph."""
    dummy = torch.randn(TRACE_BATCH, 3, *src.input_size, generator=torch.Generator().manual_seed(0))
    src.model.eval()
    with src.patches():
        export_relevance(
            src.model,
            dummy,
            out_dir / RELEVANCE_FILE,
            num_prefix_tokens=src.num_prefix_tokens,
            grid=src.grid,
            opset=opset,
        )
    return GraphFile(file=RELEVANCE_FILE, sha256=sha256_file(out_dir / RELEVANCE_FILE), outputs=[LOGITS, RELEVANCE])


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "onnx", "onnxruntime", "transformers", "timm", "vitserve"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def build_metadata(
    src: ExportSource,
    graphs: dict[str, GraphFile],
    parity: Parity,
    *,
    name: str,
    version: str = "1",
    precision: Precision = "fp32",
    extra: dict[str, str | float | int] | None = None,
) -> ArtifactMetadata:
    return ArtifactMetadata(
        name=name,
        version=version,
        labels=src.labels,
        input_size=src.input_size,
        patch_size=src.patch_size,
        grid=src.grid,
        num_layers=src.num_layers,
        num_heads=src.num_heads,
        num_prefix_tokens=src.num_prefix_tokens,
        precision=precision,
        preprocessing=src.preprocessing,
        graphs=graphs,
        source=src.source,
        exporter=library_versions(),
        parity=parity,
        extra=extra or {},
    )


def export_artifact(
    src: ExportSource,
    out_dir: Path,
    *,
    name: str | None = None,
    version: str = "1",
    opset: int = DEFAULT_OPSET,
    samples: np.ndarray | None = None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    extra: dict[str, str | float | int] | None = None,
) -> ArtifactMetadata:
    """Export, prove parity against the source model (raises ParityError), write `artifact.json`.

    Graphs are written to a temporary folder first and moved into `out_dir` only once they pass, so a failed
    export never leaves a half-written artifact where a server would load it.
    """
    from .verify import check_parity

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp)
        graphs = export_graphs(src, staging, opset=opset)
        parity = check_parity(src, staging, graphs, samples=samples, tolerance=tolerance)
        meta = build_metadata(src, graphs, parity, name=name or out_dir.name, version=version, extra=extra)
        write_metadata(staging, meta)
        out_dir.mkdir(exist_ok=True)
        for file in staging.iterdir():
            file.replace(out_dir / file.name)
    return meta
