"""The transformers and timm source adapters, on tiny random-init models built and saved here (no hub).

Each adapter is checked against its framework run untouched: the wrapper's logits against the model's own,
attention probabilities against a hand computation, preprocessing records against the framework's own image
pipeline on a real image, and an ONNX export of the wrapper against torch.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vit_artifact.preprocessing import preprocess

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
ort = pytest.importorskip("onnxruntime")

from model_export.from_hf import load_hf, processor_preprocessing  # noqa: E402
from model_export.from_timm import load_timm  # noqa: E402
from model_export.sources import CheckpointError, ExportError, ExportSource, UnsupportedModelError  # noqa: E402

HIDDEN, LAYERS, HEADS = 64, 2, 2
HF_IMAGE, HF_PATCH = 32, 8  # a 4x4 grid
TIMM_KWARGS = {"img_size": 64, "depth": LAYERS, "embed_dim": HIDDEN, "num_heads": HEADS}  # patch 16: 4x4 grid
TIMM_CLASSES = 7


def _pixels(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _photo(width: int = 57, height: int = 43) -> Image.Image:
    """A smooth-ish RGB image of an awkward size, so resize and crop both matter."""
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fixtures: tiny models saved the way users save them ---------------------------------------------------


@dataclass
class HFCase:
    directory: Path
    model: torch.nn.Module  # the model as built, before save_pretrained: the reference
    prefix_tokens: int


def _hf_config(cls: type, num_labels: int) -> object:
    labels = {i: f"class-{chr(97 + i)}" for i in range(num_labels)}
    return cls(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        image_size=HF_IMAGE,
        patch_size=HF_PATCH,
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory: pytest.TempPathFactory) -> HFCase:
    """A ViT saved with an image processor that resizes to 40x40, crops 32, bicubic, custom mean/std."""
    directory = tmp_path_factory.mktemp("hf-vit")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(_hf_config(transformers.ViTConfig, 3)).eval()
    model.save_pretrained(directory)
    transformers.ViTImageProcessor(
        size={"height": 40, "width": 40},
        do_center_crop=True,
        crop_size={"height": 32, "width": 32},
        resample=3,
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(directory)
    return HFCase(directory, model, prefix_tokens=1)


@pytest.fixture(scope="module")
def hf_deit(tmp_path_factory: pytest.TempPathFactory) -> HFCase:
    """A distilled DeiT (class + distillation token) saved without an image processor."""
    directory = tmp_path_factory.mktemp("hf-deit")
    torch.manual_seed(0)
    config = _hf_config(transformers.DeiTConfig, 4)
    model = transformers.DeiTForImageClassificationWithTeacher(config).eval()
    model.save_pretrained(directory)
    return HFCase(directory, model, prefix_tokens=2)


@pytest.fixture(params=["vit", "deit"])
def hf_case(request: pytest.FixtureRequest, hf_vit: HFCase, hf_deit: HFCase) -> HFCase:
    return hf_vit if request.param == "vit" else hf_deit


@dataclass
class TimmCase:
    name: str
    checkpoint: Path
    model: torch.nn.Module  # the model as built and saved: the reference
    prefix_tokens: int


@pytest.fixture(scope="module")
def timm_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TimmCase]:
    directory = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    cases = {}
    for name, prefix in (("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)):
        model = timm.create_model(name, pretrained=False, num_classes=TIMM_CLASSES, **TIMM_KWARGS).eval()
        checkpoint = directory / f"{name}.pth"
        torch.save(model.state_dict(), checkpoint)
        cases[name] = TimmCase(name, checkpoint, model, prefix)
    return cases


@pytest.fixture(params=["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def timm_case(request: pytest.FixtureRequest, timm_cases: dict[str, TimmCase]) -> TimmCase:
    return timm_cases[request.param]


def _load_timm(case: TimmCase, **kwargs: Any) -> ExportSource:
    return load_timm(case.name, checkpoint=str(case.checkpoint), model_kwargs=TIMM_KWARGS, **kwargs)


# --- transformers ------------------------------------------------------------------------------------------


def test_hf_logits_match_the_model_and_attentions_are_probabilities(hf_case: HFCase) -> None:
    src = load_hf(str(hf_case.directory))
    x = _pixels(3, HF_IMAGE)
    with torch.no_grad(), src.patches():
        logits, attentions = src.model(x)
        expected = hf_case.model(pixel_values=x).logits  # as built, default (SDPA) attention
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    tokens = hf_case.prefix_tokens + (HF_IMAGE // HF_PATCH) ** 2
    assert attentions.shape == (3, LAYERS, HEADS, tokens, tokens)
    torch.testing.assert_close(attentions.sum(-1), torch.ones(3, LAYERS, HEADS, tokens))
    assert (attentions >= 0).all()
    assert src.num_prefix_tokens == hf_case.prefix_tokens
    assert (src.num_layers, src.num_heads, src.patch_size, src.input_size) == (LAYERS, HEADS, HF_PATCH, (32, 32))
    assert src.grid == (4, 4)


def test_hf_record_labels_and_source(hf_case: HFCase) -> None:
    src = load_hf(str(hf_case.directory))
    num_labels = hf_case.model.config.num_labels
    assert src.labels == [f"class-{chr(97 + i)}" for i in range(num_labels)]
    weights = hf_case.directory / "model.safetensors"
    assert src.source.framework == "transformers"
    assert type(hf_case.model).__name__ in src.source.model
    assert src.source.checkpoint == hf_case.directory.name
    assert src.source.checkpoint_sha256 == _sha256(weights)


def test_hf_preprocessing_is_the_saved_processor(hf_vit: HFCase) -> None:
    src = load_hf(str(hf_vit.directory))
    spec = src.preprocessing
    assert (spec.resize, spec.resize_size, spec.crop_size) == ("squash", (40, 40), (32, 32))
    assert spec.interpolation == "bicubic"
    assert spec.mean == pytest.approx((0.4, 0.5, 0.6)) and spec.std == pytest.approx((0.2, 0.25, 0.3))

    # the record, run by the service, gives the tensor the processor itself gives
    processor = transformers.AutoImageProcessor.from_pretrained(hf_vit.directory, backend="pil")
    image = _photo()
    expected = processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, spec), expected, atol=1e-5)


def test_hf_without_processor_uses_class_defaults_and_says_so(
    hf_deit: HFCase, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="model_export.from_hf"):
        src = load_hf(str(hf_deit.directory))
    assert "no preprocessor_config.json" in caplog.text
    spec = src.preprocessing
    # DeiTImageProcessor(): resize 256, crop 224, bicubic, mean/std 0.5, scaled to a 32-pixel model
    assert (spec.resize, spec.resize_size, spec.crop_size) == ("squash", (36, 36), (32, 32))
    assert spec.interpolation == "bicubic"
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)


def test_hf_labels_file_overrides_id2label(hf_vit: HFCase, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    assert load_hf(str(hf_vit.directory), labels_file=str(labels)).labels == ["cat", "dog", "bird"]
    labels.write_text("cat\ndog\n")
    with pytest.raises(ExportError, match="2 labels but the model's head has 3"):
        load_hf(str(hf_vit.directory), labels_file=str(labels))


def test_hf_processor_mapping() -> None:
    plain = transformers.ViTImageProcessor(
        do_normalize=False,
        do_rescale=False,
        size={"shortest_edge": 40},
        do_center_crop=True,
        crop_size=32,
        resample=1,
    )
    spec = processor_preprocessing(plain, where="test")
    assert (spec.resize, spec.resize_size, spec.crop_size) == ("shortest_edge", (40, 40), (32, 32))
    assert (spec.interpolation, spec.rescale_factor) == ("lanczos", 1.0)
    assert (spec.mean, spec.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    ("processor", "message"),
    [
        (lambda: transformers.ViTImageProcessor(do_resize=False), "do_resize is false"),
        (lambda: transformers.ViTImageProcessor(size={"shortest_edge": 40}), "without a centre crop"),
        (lambda: transformers.ViTImageProcessor(resample=4), "resample=4"),  # PIL BOX
        (lambda: transformers.ConvNextImageProcessor(), "its own preprocessing steps"),
    ],
)
def test_hf_processor_steps_the_record_cannot_express_are_refused(
    processor: Callable[[], object], message: str
) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        processor_preprocessing(processor(), where="test")


def test_hf_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such directory"):
        load_hf(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_hf(str(tmp_path))


@pytest.mark.parametrize("kind", ["bert", "resnet"])
def test_hf_other_architectures_are_refused(kind: str, tmp_path: Path) -> None:
    if kind == "bert":
        model = transformers.BertModel(
            transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        )
        found = "BertModel"
    else:
        model = transformers.ResNetForImageClassification(
            transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        )
        found = "ResNetForImageClassification"
    model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=found) as error:
        load_hf(str(tmp_path))
    assert "ViTForImageClassification" in str(error.value)  # says what is supported


def test_hf_corrupt_weights(hf_vit: HFCase, tmp_path: Path) -> None:
    for file in hf_vit.directory.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot load the ViTForImageClassification weights"):
        load_hf(str(tmp_path))


# --- timm --------------------------------------------------------------------------------------------------


def test_timm_patched_logits_match_timm_and_layer0_attention_matches_by_hand(timm_case: TimmCase) -> None:
    src = _load_timm(timm_case)
    x = _pixels(2, 64)
    with torch.no_grad():
        expected = timm_case.model(x)  # timm untouched: fused attention
        with src.patches():
            logits, attentions = src.model(x)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

        # layer 0 by hand: tokens into the first block, LayerNorm, q and k, softmax(q k^T / sqrt(d))
        model = timm_case.model
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        block = model.blocks[0]
        head_dim = HIDDEN // HEADS
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(2, tokens.shape[1], 3, HEADS, head_dim)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, heads, N, head_dim)
        by_hand = torch.softmax(q @ k.transpose(-2, -1) / head_dim**0.5, dim=-1)
    torch.testing.assert_close(attentions[:, 0], by_hand, atol=1e-5, rtol=0)

    tokens_n = timm_case.prefix_tokens + 16
    assert attentions.shape == (2, LAYERS, HEADS, tokens_n, tokens_n)
    assert src.num_prefix_tokens == timm_case.prefix_tokens
    assert (src.num_layers, src.num_heads, src.patch_size, src.input_size) == (LAYERS, HEADS, 16, (64, 64))


def test_timm_forward_is_restored_after_the_patch(timm_case: TimmCase) -> None:
    src = _load_timm(timm_case)
    attention_modules = [block.attn for block in src.model.model.blocks]
    with src.patches():
        assert all("forward" in m.__dict__ for m in attention_modules)
    assert not any("forward" in m.__dict__ for m in attention_modules)
    assert all(m.forward.__func__ is timm.layers.Attention.forward for m in attention_modules)

    with pytest.raises(ZeroDivisionError), src.patches():
        1 / 0  # noqa: B018
    assert not any("forward" in m.__dict__ for m in attention_modules)

    with pytest.raises(RuntimeError, match=re.escape("inside `source.patches()`")), torch.no_grad():
        src.model(_pixels(1, 64))  # outside the patch there are no probabilities to return


def test_timm_record_labels_and_source(timm_case: TimmCase, tmp_path: Path) -> None:
    src = _load_timm(timm_case)  # num_classes read from the checkpoint's head
    assert src.labels == [str(i) for i in range(TIMM_CLASSES)]
    assert src.source.framework == "timm" and src.source.model == timm_case.name
    assert src.source.checkpoint == timm_case.checkpoint.name
    assert src.source.checkpoint_sha256 == _sha256(timm_case.checkpoint)

    labels = tmp_path / "labels.json"
    labels.write_text('["a", "b"]')
    with pytest.raises(ExportError, match="2 labels but the model's head has 7"):
        _load_timm(timm_case, labels_file=str(labels))


def test_timm_preprocessing_is_timms_eval_transform(timm_case: TimmCase) -> None:
    spec = _load_timm(timm_case).preprocessing
    config = timm.data.resolve_data_config({}, model=timm_case.model)
    assert (spec.resize, spec.resize_size, spec.crop_size) == ("shortest_edge", (71, 71), (64, 64))  # 64 / 0.9
    assert spec.interpolation == config["interpolation"]
    assert spec.mean == pytest.approx(config["mean"]) and spec.std == pytest.approx(config["std"])

    # the record, run by the service, gives the tensor timm's eval transform gives for the model's input size
    transform = timm.data.create_transform(**{**config, "input_size": (3, 64, 64)}, is_training=False)
    for image in (_photo(), _photo(43, 90)):
        np.testing.assert_allclose(preprocess(image, spec), transform(image).numpy(), atol=1e-5)


def test_timm_register_tokens_count_as_prefix_and_no_checkpoint_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model_export.from_timm"):
        src = load_timm(
            "vit_tiny_patch16_224", checkpoint=None, num_classes=3, model_kwargs={**TIMM_KWARGS, "reg_tokens": 2}
        )
    assert "random weights" in caplog.text
    assert src.num_prefix_tokens == 3
    assert src.source.checkpoint is None and src.source.checkpoint_sha256 is None
    with torch.no_grad(), src.patches():
        _, attentions = src.model(_pixels(1, 64))
    assert attentions.shape[-1] == 3 + 16


def test_timm_unsupported_models() -> None:
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        load_timm("resnet18", checkpoint=None)
    with pytest.raises(
        UnsupportedModelError, match=r"no model named 'vit_tinyy_patch16_224'; did you mean vit_tiny_patch16_224"
    ):
        load_timm("vit_tinyy_patch16_224", checkpoint=None)
    with pytest.raises(UnsupportedModelError, match="no class token"):
        load_timm(
            "vit_tiny_patch16_224",
            checkpoint=None,
            model_kwargs={**TIMM_KWARGS, "class_token": False, "global_pool": "avg"},
        )


def test_timm_checkpoint_errors(timm_cases: dict[str, TimmCase], tmp_path: Path) -> None:
    vit = timm_cases["vit_tiny_patch16_224"]
    with pytest.raises(CheckpointError, match="checkpoint head has 7 classes but --num-classes is 10"):
        _load_timm(vit, num_classes=10)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_timm(vit.name, checkpoint=str(tmp_path / "missing.pth"))

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(vit.checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable"):
        _load_timm(TimmCase(vit.name, truncated, vit.model, 1))

    # a DeiT-distilled checkpoint is not a plain ViT's: the mismatch is named, not a wall of keys
    deit = timm_cases["deit_tiny_distilled_patch16_224"]
    with pytest.raises(CheckpointError, match=r"unexpected \(dist_token, head_dist.bias") as error:
        _load_timm(TimmCase(vit.name, deit.checkpoint, vit.model, 1))
    assert "pos_embed (1, 18, 64) in the checkpoint, (1, 17, 64) in the model" in str(error.value)


def test_timm_accepts_wrapped_state_dicts(timm_cases: dict[str, TimmCase], tmp_path: Path) -> None:
    vit = timm_cases["vit_tiny_patch16_224"]
    state = torch.load(vit.checkpoint, weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    src = _load_timm(TimmCase(vit.name, wrapped, vit.model, 1))
    with torch.no_grad(), src.patches():
        torch.testing.assert_close(src.model(_pixels(1, 64))[0], vit.model(_pixels(1, 64)), atol=1e-5, rtol=0)


# --- ONNX: every adapter traces with the TorchScript exporter and runs in onnxruntime ----------------------


@pytest.mark.parametrize("which", ["hf-vit", "hf-deit", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_wrappers_export_to_onnx(
    which: str, hf_vit: HFCase, hf_deit: HFCase, timm_cases: dict[str, TimmCase], tmp_path: Path
) -> None:
    if which.startswith("hf-"):
        src = load_hf(str((hf_vit if which == "hf-vit" else hf_deit).directory))
    else:
        src = _load_timm(timm_cases[which])
    size = src.input_size[0]
    path = tmp_path / "model.onnx"
    with torch.no_grad(), src.patches():
        torch.onnx.export(
            src.model,
            (_pixels(2, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["pixel_values"],
            output_names=["logits", "attentions"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}, "attentions": {0: "batch"}},
        )
        x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(3))  # not the trace batch
        expected_logits, expected_attentions = src.model(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, attentions = session.run(["logits", "attentions"], {"pixel_values": x.numpy()})
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(attentions, expected_attentions.numpy(), atol=1e-4)
