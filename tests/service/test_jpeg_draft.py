"""`VITSERVE_JPEG_DRAFT` reaches the decoder of a running server: with it off, a photo's answer is the model's
answer on the full-resolution decode; with the default, on the reduced one (service.core.imaging._draft)."""

from __future__ import annotations

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.core.imaging import decode_image
from tests.conftest import DEFAULT_MODEL, MODELS, Server
from tests.service.conftest import classify, encode, probabilities
from vit_artifact.metadata import read_metadata
from vit_artifact.preprocessing import preprocess

LIMIT = 40_000_000


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    srv = Server(MODELS, tmp_path_factory.mktemp("strict") / "server.log", VITSERVE_JPEG_DRAFT="false")
    yield srv.wait_ready()
    srv.stop()


def expected(data: bytes, *, draft: bool) -> dict[str, float]:
    """label -> probability, from onnxruntime on the image decoded with or without the draft."""
    meta = read_metadata(DEFAULT_MODEL)
    image = decode_image(data, max_pixels=LIMIT, target_size=meta.preprocessing.resize_size, draft=draft)
    session = ort.InferenceSession(str(DEFAULT_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: preprocess(image, meta.preprocessing)[None]})
    e = np.exp(logits[0].astype(np.float64) - logits[0].max())
    return dict(zip(meta.labels, (e / e.sum()).tolist(), strict=True))


def worst(got: dict[str, float], want: dict[str, float]) -> float:
    assert got.keys() == want.keys()
    return max(abs(got[label] - want[label]) for label in want)


def test_the_setting_picks_the_decode_the_model_sees(strict_server, client, photos) -> None:
    data = encode(photos["astronaut"].resize((1024, 1024)), "JPEG", quality=90)
    full, drafted = expected(data, draft=False), expected(data, draft=True)
    assert worst(full, drafted) > 1e-4, "the photo must be one whose answer the draft moves"
    with httpx.Client(base_url=strict_server.url, timeout=60) as strict:
        assert worst(probabilities(classify(strict, data)), full) <= 1e-6
    assert worst(probabilities(classify(client, data)), drafted) <= 1e-6  # the default server: draft on
