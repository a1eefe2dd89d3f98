"""Parity gates scale with the model: rounding in a model with large logits passes, a real difference fails.

A random-init timm ViT-Ti with every parameter multiplied by 4 has sharp attention and logits about 12; fused
and explicit attention, and PyTorch and onnxruntime, round differently by more than a fixed 1e-4. It must export,
and its record must show what was measured. A graph whose weight was changed must be refused.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper

from model_export.export import export_graphs
from model_export.from_own import load_own
from model_export.from_timm import PATCH_CHECK
from model_export.sources import ParityError
from model_export.verify import check_parity
from model_export.vit import VisionTransformer, ViTConfig, save_checkpoint
from tests.conftest import run_cli
from vit_artifact.metadata import Preprocessing, read_metadata

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def scaled_vit_tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    path = tmp_path_factory.mktemp("scaled") / "vit_tiny_x4.pth"
    torch.save(model.state_dict(), path)
    return path


def test_a_scaled_timm_model_exports_and_records_the_difference(scaled_vit_tiny, tmp_path):
    out = tmp_path / "vit-x4"
    result = run_cli(
        "-m", "model_export", "timm", "vit_tiny_patch16_224", "--checkpoint", str(scaled_vit_tiny), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    p = read_metadata(out).parity
    assert p.passed and (p.atol, p.rtol) == (1e-4, 1e-4)
    assert p.max_abs_reference_logit > 5  # the large logits that made a fixed 1e-4 refuse it
    assert 1e-4 < p.max_abs_logit_diff <= p.tolerance  # over the old fixed bound, within the scaled one
    assert p.extra[PATCH_CHECK] > 1e-4  # timm's fused attention vs the recording one, as measured at load
    assert p.extra["source_float32_logit_rounding"] > 0
    assert "tolerance" in result.stdout


def test_the_cli_tolerance_governs_the_timm_attention_check(scaled_vit_tiny, tmp_path):
    result = run_cli(
        "-m",
        "model_export",
        "timm",
        "vit_tiny_patch16_224",
        "--checkpoint",
        str(scaled_vit_tiny),
        "--out",
        str(tmp_path / "strict"),
        "--atol",
        "1e-7",
        "--rtol",
        "0",
    )
    assert result.returncode == 3, result.stderr  # parity failed
    assert "attention-recording forward differs from timm's" in result.stderr
    assert "raise --rtol" in result.stderr
    assert not (tmp_path / "strict").exists()


def test_a_graph_with_a_changed_weight_is_refused(tmp_path):
    spec = Preprocessing(
        resize="squash",
        resize_size=(32, 32),
        crop_size=(32, 32),
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    config = ViTConfig(image_size=32, patch_size=8, num_classes=3, dim=32, depth=2, heads=2)
    save_checkpoint(VisionTransformer(config), str(checkpoint), labels=["a", "b", "c"], preprocessing=spec)
    src = load_own(checkpoint)
    graphs = export_graphs(src, tmp_path / "graphs")
    for graph in graphs.values():  # one weight of the first block's MLP, changed by 1%
        path = tmp_path / "graphs" / graph.file
        model = onnx.load(str(path))
        weight = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        array = numpy_helper.to_array(weight).copy()
        array.flat[0] += 0.1 * abs(array).max() + 0.05
        weight.CopyFrom(numpy_helper.from_array(array, weight.name))
        onnx.save(model, str(path))
    with pytest.raises(ParityError, match="does not compute the same function") as refused:
        check_parity(src, tmp_path / "graphs", graphs)
    assert "Check for unsupported ops or a model in training mode" in str(refused.value)
