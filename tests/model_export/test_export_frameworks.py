"""`python -m model_export hf|timm` on locally saved checkpoints: artifacts, parity records, failures."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.conftest import run_cli
from tests.frameworks import LABELS, TIMM_KWARGS
from vit_artifact.metadata import read_metadata
from vit_artifact.preprocessing import preprocess_batch


@pytest.mark.parametrize(
    ("name", "framework", "prefix"),
    [
        ("hf-vit", "transformers", 1),
        ("hf-deit", "transformers", 2),
        ("timm-vit", "timm", 1),
        ("timm-deit", "timm", 2),
    ],
)
def test_artifact_metadata(framework_models, name, framework, prefix):
    meta = read_metadata(framework_models[name].artifact)
    assert meta.source.framework == framework and len(meta.source.checkpoint_sha256 or "") == 64
    assert meta.labels == LABELS
    assert (meta.input_size, meta.patch_size, meta.grid) == ((64, 64), 16, (4, 4))
    assert (meta.num_layers, meta.num_heads, meta.num_prefix_tokens) == (2, 2, prefix)
    assert meta.parity.passed and meta.parity.max_abs_logit_diff <= 1e-4
    assert meta.parity.max_abs_attention_diff <= 1e-4 and meta.parity.top1_agreement == 1.0
    assert meta.graphs["relevance"].file == "relevance.onnx" and meta.parity.max_abs_relevance_diff <= 1e-4


def test_hf_onnx_matches_transformers_on_photos(framework_models, photos):
    from transformers import AutoModelForImageClassification

    exported = framework_models["hf-vit"]
    meta = read_metadata(exported.artifact)
    model = AutoModelForImageClassification.from_pretrained(exported.source, attn_implementation="eager").eval()
    x = preprocess_batch(list(photos.values()), meta.preprocessing)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x), output_attentions=True)
    sess = ort.InferenceSession(str(exported.artifact / "attention.onnx"), providers=["CPUExecutionProvider"])
    logits, attentions = sess.run(None, {"pixel_values": x})
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(attentions, torch.stack(out.attentions, 1).numpy(), atol=1e-5)
    assert len(set(logits.argmax(1))) > 1 or np.ptp(logits) > 1  # the sharpened head makes distinct outputs


def test_timm_onnx_matches_timm_with_fused_attention(framework_models, photos):
    import timm

    exported = framework_models["timm-vit"]
    meta = read_metadata(exported.artifact)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TIMM_KWARGS)
    model.load_state_dict(torch.load(exported.source, weights_only=True))
    model.eval()
    x = preprocess_batch(list(photos.values()), meta.preprocessing)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()  # timm's own forward, fused attention, no patch
    sess = ort.InferenceSession(str(exported.artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"pixel_values": x})[0], ref, atol=1e-4)


def test_int8_variant_of_an_hf_model(framework_models, tmp_path):
    out = tmp_path / "vit"
    result = run_cli("-m", "model_export", "hf", str(framework_models["hf-vit"].source), "--out", str(out), "--int8")
    assert result.returncode == 0, result.stderr
    meta = read_metadata(tmp_path / "vit-int8")
    assert meta.precision == "int8" and meta.parity.speedup > 0 and meta.parity.top1_agreement >= 0.75


def test_hf_directory_that_is_not_a_vit(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path / "bert")
    result = run_cli("-m", "model_export", "hf", str(tmp_path / "bert"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Bert" in result.stderr


def test_timm_architecture_that_is_not_a_vit(tmp_path):
    result = run_cli("-m", "model_export", "timm", "resnet18", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_timm_checkpoint_with_another_head(framework_models, tmp_path):
    from tests.frameworks import timm_model_args

    result = run_cli(
        "-m",
        "model_export",
        "timm",
        "vit_tiny_patch16_224",
        "--checkpoint",
        str(framework_models["timm-vit"].source),
        "--num-classes",
        "10",
        *timm_model_args(),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    assert "10" in result.stderr and "5" in result.stderr and "Traceback" not in result.stderr


def test_bad_model_arg_is_a_clear_error(tmp_path):
    result = run_cli(
        "-m", "model_export", "timm", "vit_tiny_patch16_224", "--model-arg", "nonsense", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr
