"""The service's probabilities equal the source frameworks' own inference on real photos (<= 1e-3).

transformers: its image-classification pipeline with the checkpoint's saved (PIL) image processor.
timm: the model's eval transform (`resolve_data_config` + `create_transform`) and timm's own forward.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.conftest import Server
from tests.frameworks import LABELS, TIMM_KWARGS


@pytest.fixture(scope="module")
def framework_server(framework_models, tmp_path_factory):
    model_dir = framework_models["hf-vit"].artifact.parent
    srv = Server(model_dir, tmp_path_factory.mktemp("fw") / "server.log", VITSERVE_DEFAULT_MODEL="hf-vit")
    yield srv.wait_ready()
    srv.stop()


def png(image) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def served_probabilities(server: Server, model: str, image) -> dict[str, float]:  # type: ignore[no-untyped-def]
    r = httpx.post(
        f"{server.url}/v1/models/{model}/classify?top_k={len(LABELS)}",
        files={"file": ("photo.png", png(image), "image/png")},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return {p["label"]: p["probability"] for p in r.json()["predictions"]}


@pytest.mark.parametrize("name", ["hf-vit", "hf-deit"])
def test_hf_pipeline_parity(framework_server, framework_models, photos, name):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    source = framework_models[name].source
    classifier = pipeline(
        "image-classification",
        model=AutoModelForImageClassification.from_pretrained(source),
        image_processor=AutoImageProcessor.from_pretrained(source, backend="pil"),
        device="cpu",
    )
    worst = 0.0
    for image in photos.values():
        expected = {p["label"]: p["score"] for p in classifier(image, top_k=len(LABELS))}
        served = served_probabilities(framework_server, name, image)
        assert set(served) == set(expected)
        worst = max(worst, max(abs(served[k] - expected[k]) for k in expected))
        assert max(expected.values()) - min(expected.values()) > 0.2  # far from uniform: the check can fail
    assert worst <= 1e-3, worst


@pytest.mark.parametrize(
    ("name", "arch"), [("timm-vit", "vit_tiny_patch16_224"), ("timm-deit", "deit_tiny_distilled_patch16_224")]
)
def test_timm_eval_transform_parity(framework_server, framework_models, photos, name, arch):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(arch, num_classes=len(LABELS), **TIMM_KWARGS)
    model.load_state_dict(torch.load(framework_models[name].source, weights_only=True))
    model.eval()
    config = resolve_data_config({}, model=model)
    config["input_size"] = (3, *TIMM_KWARGS["img_size"] * np.ones(2, int))  # the checkpoint's resolution
    transform = create_transform(**config)
    worst = 0.0
    for image in photos.values():
        with torch.no_grad():
            probs = model(transform(image)[None]).softmax(-1)[0].numpy()
        served = served_probabilities(framework_server, name, image)
        worst = max(worst, max(abs(served[label] - float(p)) for label, p in zip(LABELS, probs, strict=True)))
    assert worst <= 1e-3, worst


def test_no_torch_in_the_serving_process(framework_server, photos):
    """The server imports no torch, even after serving every route (checked from its own /proc maps)."""
    image = png(photos["chelsea"])
    for route in ("classify", "attention", "attention?format=png"):
        assert (
            httpx.post(
                f"{framework_server.url}/v1/{route}", content=image, headers={"content-type": "image/png"}, timeout=60
            ).status_code
            == 200
        )
    maps = Path(f"/proc/{framework_server.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps
