"""Graph rewrites applied when a graph is loaded for onnxruntime's CPU provider.

Layer normalization as primitive ops. onnxruntime 1.32's CPU kernels for `LayerNormalization` and its fused
`SkipLayerNormalization` (com.microsoft; onnxruntime's optimizer makes it from Add + LayerNormalization) made up a
quarter of the default model's kernel time (onnxruntime's profiler, batch 16); the same normalization written as
ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div, Mul, Add, which run on its vectorised elementwise kernels, made
the whole classify graph cost 13-18% less CPU per image for the default model (1 and 2 threads, interleaved runs)
and 3% less for ViT-B/16 (within noise); logits moved by at most 2e-6. The rewritten graph is loaded with
onnxruntime's layer-norm fusions off, so they do not put the kernel back. GPU sessions are left as exported
(CUDA's fused kernel is the fast one there); `VITSERVE_CPU_GRAPH_REWRITES=false` turns the rewrite off.

Only nodes whose meaning is certain are rewritten: normalization over the last axis, float32 scale (and bias)
given as initializers, and, for SkipLayerNormalization, no use of its mean or inverse-deviation outputs. Others
stay as they are. The graph is edited through service.core.onnx_proto (the serving install has no `onnx`); graphs
that keep their weights in external files (over 2 GB) are left alone, since they cannot be one protobuf.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.core import onnx_proto

log = logging.getLogger("vitserve.graph_rewrite")

# onnxruntime's optimizers that would fuse the primitive ops back into the slow kernel.
LAYER_NORM_FUSIONS = ["LayerNormFusion", "SkipLayerNormFusion", "SimplifiedLayerNormFusion"]
_MICROSOFT = "com.microsoft"


def rewrite_layer_norms(path: Path) -> bytes | None:
    """The graph at `path` with its layer normalizations as primitive ops, serialized; None when there is
    nothing to rewrite (or the graph keeps its weights in external files)."""
    model = onnx_proto.load(path.read_bytes())
    if any(t.data_location == onnx_proto.EXTERNAL for t in model.graph.initializer):
        return None
    count = decompose_layer_norms(model)
    if count == 0:
        return None
    log.info("%s: %d layer normalizations written as primitive ops for the CPU provider", path.name, count)
    return model.SerializeToString()


def decompose_layer_norms(model: Any) -> int:
    """Rewrite, in place, every layer normalization of the main graph (of a service.core.onnx_proto ModelProto)
    this module can; returns how many."""
    node = onnx_proto.node
    graph = model.graph
    float32 = {t.name for t in graph.initializer if t.data_type == onnx_proto.FLOAT}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    axes = "_vitserve_ln_axes"  # an initializer from opset 18 on, added with the first rewrite

    def reduce_mean(x: str, out: str) -> Any:
        if opset >= 18:  # axes became an input in opset 18
            if not any(t.name == axes for t in graph.initializer):
                graph.initializer.append(
                    onnx_proto.tensor(axes, onnx_proto.INT64, [1], np.array([-1], "<i8").tobytes())
                )
            return node("ReduceMean", [x, axes], [out], keepdims=1)
        return node("ReduceMean", [x], [out], axes=[-1], keepdims=1)

    nodes: list[Any] = []
    count = 0
    for original in graph.node:
        parts = _layer_norm_parts(original, float32)
        if parts is None:
            nodes.append(original)
            continue
        x, gamma, beta, epsilon, extra = parts
        p = f"_vitserve_ln{count}_"
        eps = p + "eps"
        graph.initializer.append(onnx_proto.tensor(eps, onnx_proto.FLOAT, [], np.array(epsilon, "<f4").tobytes()))
        if original.op_type == "SkipLayerNormalization":  # x = input + skip (+ bias), also an output when asked for
            nodes.append(node("Add", [x, original.input[1]], [p + "sum0"]))
            total = p + "sum0"
            if extra:
                nodes.append(node("Add", [total, extra], [p + "sum"]))
                total = p + "sum"
            if len(original.output) > 3 and original.output[3]:
                nodes.append(node("Identity", [total], [original.output[3]]))
            x = total
        scaled = p + "scaled" if beta else original.output[0]
        nodes += [
            reduce_mean(x, p + "mean"),
            node("Sub", [x, p + "mean"], [p + "centred"]),
            node("Mul", [p + "centred", p + "centred"], [p + "squared"]),
            reduce_mean(p + "squared", p + "var"),
            node("Add", [p + "var", eps], [p + "var_eps"]),
            node("Sqrt", [p + "var_eps"], [p + "std"]),
            node("Div", [p + "centred", p + "std"], [p + "normed"]),
            node("Mul", [p + "normed", gamma], [scaled]),
        ]
        if beta:
            nodes.append(node("Add", [scaled, beta], [original.output[0]]))
        count += 1
    if count == 0:
        return 0
    kept = [n.SerializeToString() for n in nodes]  # copies: the originals belong to the field cleared next
    graph.ClearField("node")
    for data in kept:
        graph.node.add().ParseFromString(data)
    return count


def _layer_norm_parts(node: Any, float32: set[str]) -> tuple[str, str, str, float, str] | None:
    """(input, scale, bias or "", epsilon, SkipLayerNormalization's bias or "") of a layer normalization this
    module may rewrite, else None."""
    attrs = {a.name: a for a in node.attribute}
    epsilon = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
    inputs = list(node.input) + [""] * 5
    if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
        if "axis" in attrs and attrs["axis"].i != -1:
            return None
        if "stash_type" in attrs and attrs["stash_type"].i != 1:  # 1: float32 statistics
            return None
        if len(node.output) > 1 and any(node.output[1:]):  # mean / inverse deviation asked for
            return None
        gamma, beta, extra = inputs[1], inputs[2], ""
    elif node.op_type == "SkipLayerNormalization" and node.domain == _MICROSOFT:
        if len(node.output) > 1 and any(node.output[1:3]):
            return None
        gamma, beta, extra = inputs[2], inputs[3], inputs[4]
    else:
        return None
    if gamma not in float32 or (beta and beta not in float32) or (extra and extra not in float32):
        return None
    return inputs[0], gamma, beta, epsilon, extra
