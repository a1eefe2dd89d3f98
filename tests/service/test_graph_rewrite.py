"""Layer normalization written as primitive ops for the CPU provider (service/core/graph_rewrite.py): the same answers
as onnxruntime's own kernels, on the real default model and on small graphs of every form the rewrite takes,
and the forms it must leave alone are left alone."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.core import onnx_proto
from service.core.graph_rewrite import LAYER_NORM_FUSIONS, decompose_layer_norms, rewrite_layer_norms
from service.core.pipeline import prepare
from tests.conftest import DEFAULT_MODEL, MODELS, Server
from vit_artifact.metadata import INPUT_NAME, LOGITS, read_metadata

LAYER_NORMS = {"LayerNormalization", "SkipLayerNormalization"}


def session(model: str | bytes, **kwargs: object) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if "optimized" in kwargs:
        options.optimized_model_filepath = str(kwargs.pop("optimized"))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"], **kwargs)


@pytest.fixture(scope="module")
def digit_batch(held_out_pngs: list[bytes]) -> np.ndarray:
    meta = read_metadata(DEFAULT_MODEL)
    return np.stack([prepare(png, meta, max_pixels=10**7).pixels for png in held_out_pngs[:16]])


@pytest.mark.parametrize("graph", ["classify", "attention"])
def test_default_model_same_answers_without_layer_norm_kernels(graph: str, digit_batch: np.ndarray, tmp_path: Path):
    meta = read_metadata(DEFAULT_MODEL)
    path = DEFAULT_MODEL / meta.graphs[graph].file
    assert LAYER_NORMS & {n.op_type for n in onnx.load(str(path)).graph.node}, "the exported graph normalizes"
    rewritten = rewrite_layer_norms(path)
    assert rewritten is not None
    assert not LAYER_NORMS & {n.op_type for n in onnx.load_from_string(rewritten).graph.node}
    optimized = tmp_path / "optimized.onnx"
    fast = session(rewritten, disabled_optimizers=LAYER_NORM_FUSIONS, optimized=optimized)
    # onnxruntime's optimizer did not fuse the primitive ops back into its kernel
    assert not LAYER_NORMS & {n.op_type for n in onnx.load(str(optimized)).graph.node}
    names = [o.name for o in fast.get_outputs()]
    want = session(str(path)).run(names, {INPUT_NAME: digit_batch})
    got = fast.run(names, {INPUT_NAME: digit_batch})
    for name, a, b in zip(names, want, got, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=name)
    assert (got[names.index(LOGITS)].argmax(1) == want[names.index(LOGITS)].argmax(1)).all()


def _graph(nodes: list, inputs: dict[str, list[int]], output: str, initializers: dict[str, np.ndarray], opset: int):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, SHAPE)],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    )


def rewrite(model: onnx.ModelProto) -> tuple[int, onnx.ModelProto]:
    """decompose_layer_norms through service.core.onnx_proto's schema subset, back as onnx's own ModelProto."""
    subset = onnx_proto.load(model.SerializeToString())
    count = decompose_layer_norms(subset)
    return count, onnx.load_from_string(subset.SerializeToString())


def test_schema_subset_round_trips_a_whole_model():
    """What service.core.onnx_proto does not declare (names, shapes, metadata, doc strings) comes back unchanged."""
    original = onnx.load(str(DEFAULT_MODEL / "model.onnx"))
    again = onnx.load_from_string(onnx_proto.load(original.SerializeToString()).SerializeToString())
    assert again == original


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * gamma + beta


RNG = np.random.default_rng(0)
SHAPE = [2, 5, 16]
X, SKIP = (RNG.normal(size=SHAPE).astype(np.float32) * 3 + 1 for _ in range(2))
WEIGHTS = {n: RNG.normal(size=16).astype(np.float32) for n in ("gamma", "beta", "bias")}


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: an attribute before 18, an input from 18
def test_layer_normalization(opset: int):
    node = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-3)
    model = _graph([node], {"x": SHAPE}, "y", {k: WEIGHTS[k] for k in ("gamma", "beta")}, opset)
    count, model = rewrite(model)
    assert count == 1
    onnx.checker.check_model(model, full_check=True)
    (y,) = session(model.SerializeToString(), disabled_optimizers=LAYER_NORM_FUSIONS).run(None, {"x": X})
    np.testing.assert_allclose(y, _layer_norm(X, WEIGHTS["gamma"], WEIGHTS["beta"], 1e-3), atol=1e-5)


def test_skip_layer_normalization_with_bias_and_its_sum_output():
    """The fused form onnxruntime's transformer optimizer writes: input + skip + bias, normalized, and the
    sum itself as the fourth output (the next residual reads it)."""
    node = helper.make_node(
        "SkipLayerNormalization",
        ["x", "skip", "gamma", "beta", "bias"],
        ["y", "", "", "sum"],
        domain="com.microsoft",
        epsilon=1e-5,
    )
    out = helper.make_node("Add", ["y", "sum"], ["z"])
    model = _graph([node, out], {"x": SHAPE, "skip": SHAPE}, "z", WEIGHTS, 17)
    count, model = rewrite(model)
    assert count == 1
    assert "SkipLayerNormalization" not in {n.op_type for n in model.graph.node}
    (z,) = session(model.SerializeToString(), disabled_optimizers=LAYER_NORM_FUSIONS).run(None, {"x": X, "skip": SKIP})
    total = X.astype(np.float64) + SKIP + WEIGHTS["bias"]
    np.testing.assert_allclose(z, _layer_norm(total, WEIGHTS["gamma"], WEIGHTS["beta"], 1e-5) + total, atol=1e-5)


@pytest.mark.parametrize(
    "why, node, initializers",
    [
        ("another axis", helper.make_node("LayerNormalization", ["x", "gamma"], ["y"], axis=1), {"gamma": np.ones(5)}),
        (
            "statistics in another type",
            helper.make_node("LayerNormalization", ["x", "gamma"], ["y"], stash_type=0),
            {"gamma": np.ones(16)},
        ),
        ("a scale computed in the graph", helper.make_node("LayerNormalization", ["x", "x2"], ["y"]), {}),
        (
            "its mean is an output",
            helper.make_node("LayerNormalization", ["x", "gamma"], ["y", "mean"]),
            {"gamma": np.ones(16)},
        ),
        ("a float64 scale", helper.make_node("LayerNormalization", ["x", "gamma"], ["y"]), {"gamma": np.ones(16)}),
    ],
)
def test_left_alone(why: str, node, initializers: dict[str, np.ndarray]):
    dtype = np.float64 if why == "a float64 scale" else np.float32
    model = _graph([node], {"x": SHAPE}, "y", {k: v.astype(dtype) for k, v in initializers.items()}, 17)
    count, after = rewrite(model)
    assert count == 0, why
    assert after == model


@pytest.mark.server
def test_served_logits_agree_with_the_rewrite_on_and_off(tmp_path: Path, held_out_pngs: list[bytes]):
    """Through HTTP: the default model served with the rewrite (the default) and without it answers alike."""
    logits = {}
    for on in ("true", "false"):
        server = Server(MODELS, tmp_path / f"{on}.log", VITSERVE_CPU_GRAPH_REWRITES=on, VITSERVE_LOG_LEVEL="info")
        try:
            server.wait_ready()
            files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(held_out_pngs[:8])]
            response = httpx.post(f"{server.url}/v1/classify/batch", files=files, params={"top_k": 10}, timeout=60)
            assert response.status_code == 200, response.text
            logits[on] = [{p["label"]: p["probability"] for p in r["predictions"]} for r in response.json()["results"]]
        finally:
            assert server.stop() == 0
        rewrote = "written as primitive ops" in (tmp_path / f"{on}.log").read_text()
        assert rewrote == (on == "true")
    for a, b in zip(logits["true"], logits["false"], strict=True):
        assert a.keys() == b.keys()
        for label in a:
            assert a[label] == pytest.approx(b[label], abs=1e-6)
