"""Export of the project's own ViT through the real CLI; parity against PyTorch; error cases."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_export.vit import VisionTransformer, ViTConfig, save_checkpoint
from tests.conftest import run_cli
from vit_artifact.metadata import ATTENTIONS, LOGITS, ArtifactError, Preprocessing, read_metadata
from vit_artifact.preprocessing import preprocess_batch

SPEC = Preprocessing(
    resize="shortest_edge",
    resize_size=(36, 36),
    crop_size=(32, 32),
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
CONFIG = ViTConfig(image_size=32, patch_size=8, num_classes=3, dim=32, depth=2, heads=2)
LABELS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("own") / "tiny.pt"
    save_checkpoint(VisionTransformer(CONFIG), str(path), labels=LABELS, preprocessing=SPEC)
    return path


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    result = run_cli("-m", "model_export", "own", str(checkpoint), "--out", str(out), "--int8", "--fp16")
    assert result.returncode == 0, result.stderr
    assert "max |logit diff|" in result.stdout
    return out


def test_metadata_round_trip_carries_what_serving_needs(artifact, checkpoint):
    meta = read_metadata(artifact)
    assert meta.name == "tiny" and meta.labels == LABELS
    assert meta.preprocessing == SPEC and meta.preprocessing.crop_pct == pytest.approx(32 / 36, abs=1e-6)
    assert (meta.input_size, meta.patch_size, meta.grid) == ((32, 32), 8, (4, 4))
    assert (meta.num_layers, meta.num_heads, meta.num_prefix_tokens) == (2, 2, 1)
    assert meta.source.framework == "vitserve" and len(meta.source.checkpoint_sha256 or "") == 64
    assert {"torch", "onnx", "onnxruntime"} <= set(meta.exporter)
    assert meta.parity.passed and meta.parity.max_abs_logit_diff <= 1e-4
    assert meta.parity.top1_agreement == 1.0
    assert any("real images" in s for s in meta.parity.inputs)
    # what was written is what is read
    raw = json.loads((artifact / "artifact.json").read_text())
    assert type(meta).model_validate(raw) == meta


def test_onnx_matches_pytorch_on_photos_at_a_new_batch_size(artifact, checkpoint, photos):
    model = VisionTransformer(CONFIG)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    x = preprocess_batch(list(photos.values()), SPEC)  # batch 4; the trace used 2
    with torch.no_grad():
        ref_logits, ref_att = (t.numpy() for t in model.forward_with_attention(torch.from_numpy(x)))
    classify = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    attention = ort.InferenceSession(str(artifact / "attention.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = classify.run([LOGITS], {"pixel_values": x})
    a_logits, att = attention.run([LOGITS, ATTENTIONS], {"pixel_values": x})
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    np.testing.assert_allclose(a_logits, ref_logits, atol=1e-4)
    np.testing.assert_allclose(att, ref_att, atol=1e-5)
    assert att.shape == (4, 2, 2, 17, 17)


def test_classify_graph_does_not_compute_attention_outputs(artifact):
    outputs = [o.name for o in ort.InferenceSession(str(artifact / "model.onnx")).get_outputs()]
    assert outputs == [LOGITS]


def test_int8_variant_records_agreement_and_speed(artifact):
    meta = read_metadata(artifact.with_name("tiny-int8"))
    assert meta.precision == "int8" and meta.name == "tiny-int8"
    assert meta.parity.reference == "FP32 artifact tiny"
    assert 0.0 <= meta.parity.top1_agreement <= 1.0 and meta.parity.speedup > 0
    q = meta.quantization
    assert q is not None and (q.mode, q.op_types, q.per_channel) == ("dynamic", ["MatMul"], True)
    assert not meta.batch_invariant  # so the service runs it one image per call


def test_static_int8_is_calibrated_on_the_given_images_and_batch_invariant(checkpoint, photos, tmp_path):
    images = tmp_path / "calibration"
    images.mkdir()
    for name, photo in photos.items():
        photo.save(images / f"{name}.png")
    (images / "README.txt").write_text("not an image: skipped")
    out = tmp_path / "static"
    result = run_cli(
        "-m", "model_export", "own", str(checkpoint), "--out", str(out), "--int8",
        "--calibration", str(images), "--calibrate", "percentile",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "int8 variant (static)" in result.stdout
    meta = read_metadata(out.with_name("static-int8"))
    q = meta.quantization
    assert q is not None and (q.mode, q.calibration, q.calibration_images) == ("static", "percentile", len(photos))
    assert meta.batch_invariant
    x = preprocess_batch(list(photos.values()), SPEC)
    sess = ort.InferenceSession(str(out.with_name("static-int8") / "model.onnx"), providers=["CPUExecutionProvider"])
    alone = np.concatenate([sess.run([LOGITS], {"pixel_values": x[i : i + 1]})[0] for i in range(len(x))])
    np.testing.assert_array_equal(sess.run([LOGITS], {"pixel_values": x})[0], alone)


def test_static_int8_without_calibration_images_says_what_to_give(checkpoint, tmp_path):
    result = run_cli(
        "-m", "model_export", "own", str(checkpoint), "--out", str(tmp_path / "o"), "--int8", "--calibrate", "minmax"
    )
    assert result.returncode == 2 and "--calibration DIR" in result.stderr
    assert not (tmp_path / "o").exists()  # refused before exporting anything


def test_fp16_variant_keeps_float32_inputs_and_outputs(artifact):
    meta = read_metadata(artifact.with_name("tiny-fp16"))
    assert meta.precision == "fp16" and meta.name == "tiny-fp16"
    sess = ort.InferenceSession(str(artifact.with_name("tiny-fp16") / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    if meta.parity.passed:  # verified here when the CPU provider can run it
        assert meta.parity.max_abs_logit_diff < 0.05


def test_tampered_graph_is_refused(artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    with (copy / "model.onnx").open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(ArtifactError, match="sha256 differs"):
        read_metadata(copy)


def test_parity_failure_exits_3_and_leaves_nothing_behind(checkpoint, tmp_path):
    out = tmp_path / "strict"
    result = run_cli(
        "-m", "model_export", "own", str(checkpoint), "--out", str(out),
        "--atol", "1e-12", "--rtol", "0", "--rounding-factor", "0",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "parity check failed" in result.stderr and "tolerance" in result.stderr
    assert not out.exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_cli("-m", "model_export", "own", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_checkpoint_is_a_clear_error(checkpoint, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(checkpoint.read_bytes()[:3000])
    result = run_cli("-m", "model_export", "own", str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "could not be read" in result.stderr and "Traceback" not in result.stderr


def test_not_a_vit_checkpoint_is_refused(tmp_path):
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    result = run_cli("-m", "model_export", "own", str(other), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "not a vitserve ViT checkpoint" in result.stderr


def test_label_file_must_match_the_head(checkpoint, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    result = run_cli(
        "-m", "model_export", "own", str(checkpoint), "--labels", str(labels), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2
    assert "has 2 labels but the model's head has 3 classes" in result.stderr
