"""The relevance graph: the rule against an independent autograd implementation, its export, `add-relevance`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_export.from_artifact import load_own_from_artifact
from model_export.relevance import relevance_maps
from model_export.vit import VisionTransformer, ViTConfig, save_checkpoint
from tests.conftest import DEFAULT_MODEL, MODELS, run_cli
from tests.relevance_reference import autograd_relevance, normalised, own_forward
from vit_artifact.metadata import INPUT_NAME, TARGET_NAME, Preprocessing, read_metadata, sha256_file

CONFIG = ViTConfig(image_size=32, patch_size=8, num_classes=4, dim=32, depth=2, heads=2)
SPEC = Preprocessing(
    resize="squash", resize_size=(32, 32), crop_size=(32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3
)


def _model() -> VisionTransformer:
    torch.manual_seed(3)
    model = VisionTransformer(CONFIG).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # peaked predictions: the classes' maps then differ visibly
    return model


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("relevance")
    save_checkpoint(_model(), str(root / "tiny.pt"), labels=list("abcd"), preprocessing=SPEC)
    result = run_cli("-m", "model_export", "own", str(root / "tiny.pt"), "--out", str(root / "tiny"), "--int8")
    assert result.returncode == 0, result.stderr
    return root / "tiny"


def test_rule_matches_the_authors_way_of_computing_it():
    model, x = _model(), _images(4)
    targets = [None, 2, 3, 0]
    want, explained = autograd_relevance(own_forward(model), x, targets, num_prefix_tokens=1, grid=(4, 4))
    logits, got = relevance_maps(
        model, torch.from_numpy(x), torch.tensor([-1, 2, 3, 0]), num_prefix_tokens=1, grid=(4, 4)
    )
    assert explained[0] == int(logits[0].argmax())  # -1 asks for the top prediction
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)
    assert not np.allclose(normalised(want[1:2]), normalised(want[2:3]))  # another class, another map


def test_export_writes_a_verified_relevance_graph(artifact):
    meta = read_metadata(artifact)
    assert meta.graphs["relevance"].outputs == ["logits", "relevance"]
    assert meta.parity.max_abs_relevance_diff is not None and meta.parity.max_abs_relevance_diff <= 1e-4
    assert meta.parity.extra["relevance_targets_per_image"] == 3


@pytest.mark.parametrize("batch", [1, 5])
def test_graph_matches_autograd_at_any_batch_with_mixed_targets(artifact, batch):
    x = _images(batch)
    targets = np.array([-1, 0, 1, 2, 3][:batch], dtype=np.int64)
    sess = ort.InferenceSession(str(artifact / "relevance.onnx"), providers=["CPUExecutionProvider"])
    logits, maps = sess.run(None, {INPUT_NAME: x, TARGET_NAME: targets})
    assert maps.shape == (batch, 4, 4) and logits.shape == (batch, 4)
    want, _ = autograd_relevance(
        own_forward(_model()), x, [None if t < 0 else int(t) for t in targets], num_prefix_tokens=1, grid=(4, 4)
    )
    assert np.abs(normalised(maps) - normalised(want)).max() <= 1e-4


def test_reduced_precision_variants_carry_no_relevance_graph(artifact):
    meta = read_metadata(artifact.with_name("tiny-int8"))
    assert "relevance" not in meta.graphs and not (artifact.with_name("tiny-int8") / "relevance.onnx").exists()
    assert meta.extra["relevance"].startswith("FP32 only")
    assert read_metadata(MODELS / "digits-vit-int8").extra["relevance"].startswith("FP32 only")


def test_add_relevance_keeps_the_served_graphs_and_matches_autograd(tmp_path):
    target = tmp_path / "digits-vit"
    shutil.copytree(DEFAULT_MODEL, target)
    record = json.loads((target / "artifact.json").read_text())
    del record["graphs"]["relevance"]  # as exported before relevance graphs existed
    (target / "artifact.json").write_text(json.dumps(record))
    (target / "relevance.onnx").unlink()
    before = {f: sha256_file(target / f) for f in ("model.onnx", "attention.onnx")}

    result = run_cli("-m", "model_export", "add-relevance", str(target))
    assert result.returncode == 0, result.stderr
    meta = read_metadata(target)
    assert {f: sha256_file(target / f) for f in before} == before  # served logits cannot change
    assert meta.parity.max_abs_relevance_diff <= 1e-4 and meta.parity.extra["relevance_rebuilt_logit_diff"] <= 1e-4

    src = load_own_from_artifact(target)
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    sess = ort.InferenceSession(str(target / "relevance.onnx"), providers=["CPUExecutionProvider"])
    _, maps = sess.run(None, {INPUT_NAME: x, TARGET_NAME: np.array([4, -1, 9])})
    want, _ = autograd_relevance(own_forward(src.model.model), x, [4, None, 9], num_prefix_tokens=1, grid=meta.grid)
    assert np.abs(normalised(maps) - normalised(want)).max() <= 1e-4


def test_add_relevance_refuses_a_quantized_artifact(tmp_path):
    result = run_cli("-m", "model_export", "add-relevance", str(MODELS / "digits-vit-int8"))
    assert result.returncode == 2
    assert "only FP32 artifacts" in result.stderr and "Re-export" in result.stderr
