"""Give an existing artifact of the project's own ViT a relevance graph, from the weights inside its ONNX graph.

Re-training would not reproduce committed weights byte for byte on another machine or library version, and a
checkpoint is not part of an artifact. The attention graph holds every weight, so the PyTorch model is rebuilt
from its initializers, checked against the artifact's own classify graph, and the relevance graph is traced
from it. The classify and attention graphs are left as they are: served logits do not change.

    python -m model_export add-relevance models/digits-vit
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from vit_artifact.metadata import LOGITS, ArtifactMetadata, read_metadata, write_metadata

from .from_own import WithAttention
from .sources import DEFAULT_TOLERANCE, ExportSource, ParityError, Tolerance, UnsupportedModelError
from .vit import VisionTransformer, ViTConfig

log = logging.getLogger(__name__)

_PREFIX = "model."  # the attention graph was traced from `WithAttention`, which holds the ViT as `model`


def load_own_from_artifact(directory: Path) -> ExportSource:
    """The PyTorch model behind an FP32 artifact of `model_export.vit.VisionTransformer`."""
    meta = read_metadata(directory)
    if meta.source.framework != "vitserve" or meta.precision != "fp32":
        raise UnsupportedModelError(
            f"{directory} is a {meta.precision} {meta.source.framework} artifact; only FP32 artifacts of the "
            "project's own ViT can be rebuilt from their graphs. Re-export the source model instead (`python -m "
            "model_export hf|timm|own ... --out DIR`), which writes the relevance graph too"
        )
    state = _state_dict(onnx.load(str(directory / meta.graphs["attention"].file)))
    dim = int(state["cls_token"].shape[-1])
    hidden = int(state["blocks.0.mlp.net.0.weight"].shape[0])
    if meta.input_size[0] != meta.input_size[1]:
        raise UnsupportedModelError(f"{directory}: the project's ViT takes square images, not {meta.input_size}")
    config = ViTConfig(
        image_size=meta.input_size[0],
        patch_size=meta.patch_size,
        num_classes=len(meta.labels),
        dim=dim,
        depth=meta.num_layers,
        heads=meta.num_heads,
        mlp_ratio=hidden / dim,
    )
    model = VisionTransformer(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UnsupportedModelError(f"{directory}: the graph's weights do not fit the project's ViT: {e}") from e
    return ExportSource(
        model=WithAttention(model.eval()),
        labels=meta.labels,
        input_size=meta.input_size,
        patch_size=meta.patch_size,
        num_layers=meta.num_layers,
        num_heads=meta.num_heads,
        num_prefix_tokens=meta.num_prefix_tokens,
        preprocessing=meta.preprocessing,
        source=meta.source,
    )


def _state_dict(graph: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Named initializers as they are; each Linear's weight, which the exporter folded into an anonymous
    transposed MatMul operand, found through the Add that takes the output and the layer's named bias."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    state = {k.removeprefix(_PREFIX): torch.from_numpy(v.copy()) for k, v in values.items() if k.startswith(_PREFIX)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in values or node.input[1].startswith(_PREFIX):
            continue
        for add in consumers.get(node.output[0], []):
            bias = next((i for i in add.input if i.startswith(_PREFIX) and i.endswith(".bias")), None)
            if add.op_type == "Add" and bias is not None:
                key = bias.removeprefix(_PREFIX).removesuffix(".bias") + ".weight"
                state[key] = torch.from_numpy(values[node.input[1]].T.copy())  # MatMul's (in, out) is Linear's .T
    return state


def add_relevance(directory: Path, *, tolerance: Tolerance = DEFAULT_TOLERANCE) -> ArtifactMetadata:
    """Write `relevance.onnx` into an artifact and record it and its parity in `artifact.json`."""
    from .export import export_relevance_graph
    from .verify import check_relevance_parity, run_in_batches, session, verification_inputs

    directory = Path(directory)
    meta = read_metadata(directory)
    src = load_own_from_artifact(directory)
    x, _ = verification_inputs(src)
    with torch.no_grad():
        ref_logits = np.concatenate([src.model(torch.from_numpy(x[i : i + 8]))[0].numpy() for i in range(0, len(x), 8)])
    (served,) = run_in_batches(session(directory / meta.graphs["classify"].file), x, [LOGITS])
    scale = float(np.abs(ref_logits).max())
    rebuilt_diff = float(np.abs(served - ref_logits).max())
    if not rebuilt_diff <= tolerance.bound(scale):
        raise ParityError(
            f"{directory}: the model rebuilt from the attention graph differs from the classify graph by "
            f"{rebuilt_diff:.3g} (bound {tolerance.bound(scale):.3g}); the two graphs do not hold the same weights"
        )
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}-") as tmp:
        staging = Path(tmp)
        graph = export_relevance_graph(src, staging)
        numbers = check_relevance_parity(src, staging / graph.file, x, ref_logits, tolerance=tolerance)
        parity = meta.parity.model_copy(
            update={
                "max_abs_relevance_diff": numbers.pop("max_abs_relevance_diff"),
                "extra": {**meta.parity.extra, **numbers, "relevance_rebuilt_logit_diff": rebuilt_diff},
            }
        )
        updated = meta.model_copy(update={"graphs": {**meta.graphs, "relevance": graph}, "parity": parity})
        (staging / graph.file).replace(directory / graph.file)
    write_metadata(directory, ArtifactMetadata.model_validate(updated.model_dump()))
    log.info("%s: relevance graph added (max |scaled map diff| %.2e)", directory, parity.max_abs_relevance_diff)
    return updated
