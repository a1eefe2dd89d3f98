"""Both clients, every method, against the live server with real images."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from vitserve_client import (
    AsyncClient,
    AttentionBatchResponse,
    AttentionPNG,
    AttentionResponse,
    ClassifyResponse,
    Client,
    InvalidParameterError,
    NotFoundError,
)
from vitserve_client._core import BaseClient


def test_clients_mirror_each_other_method_for_method() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(fn)
            for name, fn in vars(cls).items()
            if callable(fn) and not name.startswith("_") and name not in {"close", "aclose"}
        }

    sync, asynchronous = public(Client), public(AsyncClient)
    assert (
        set(sync)
        == set(asynchronous)
        == {"health", "ready", "models", "model", "classify", "classify_batch", "attention", "attention_batch"}
    )
    for name, signature in sync.items():
        assert asynchronous[name] == signature, name
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
        assert not inspect.iscoroutinefunction(getattr(Client, name)), name
    # Only I/O differs: building requests and parsing answers live in the shared base.
    assert Client.__bases__ == AsyncClient.__bases__ == (BaseClient,)


def test_health_and_ready(api: Any) -> None:
    assert api.health().ok
    ready = api.ready()
    assert ready.ok and ready.models == {"digits-vit": True, "digits-vit-int8": True}


def test_models_and_model_match_the_server(api: Any, client: httpx.Client) -> None:
    listing = api.models()
    raw = client.get("/v1/models").json()
    assert listing.default == raw["default"] == "digits-vit"
    assert [m.name for m in listing.models] == [m["name"] for m in raw["models"]]
    info = api.model("digits-vit")
    assert info == listing.get("digits-vit")
    assert info.labels == [str(i) for i in range(10)] and info.labels_count == 10
    assert (info.grid.height, info.grid.width, info.layers, info.heads) == (8, 8, 4, 4)
    assert info.input_size == (32, 32) and info.patch_size == 4 and info.default and info.attention
    assert info.parity.passed and info.preprocessing.crop_size == (32, 32)
    assert info.parity.max_abs_logit_diff == raw["models"][0]["parity"]["max_abs_logit_diff"]  # extra fields kept
    int8 = api.model("digits-vit-int8")
    assert int8.precision == "int8" and not int8.default


def _as(kind: str, digit: Any, tmp_path: Path) -> Any:
    path = tmp_path / "digit.png"
    path.write_bytes(digit.png)
    return {
        "str path": lambda: str(path),
        "Path": lambda: path,
        "bytes": lambda: digit.png,
        "file object": lambda: path.open("rb"),
        "PIL image": lambda: Image.fromarray(digit.image),
        "numpy gray": lambda: digit.image,
        "numpy gray HxWx1": lambda: digit.image[:, :, None],
        "numpy RGB": lambda: np.repeat(digit.image[:, :, None], 3, axis=2),
    }[kind]()


@pytest.mark.parametrize(
    "kind",
    ["str path", "Path", "bytes", "file object", "PIL image", "numpy gray", "numpy gray HxWx1", "numpy RGB"],
)
def test_classify_every_input_kind(
    api: Any, client: httpx.Client, digits: list[Any], tmp_path: Path, kind: str
) -> None:
    digit = digits[0]
    image = _as(kind, digit, tmp_path)
    result = api.classify(image, top_k=3)
    if hasattr(image, "close"):
        image.close()
    # The same pixels as the plain-httpx reference, however they were handed over.
    reference = client.post("/v1/classify", files={"file": ("d.png", digit.png, "image/png")}).json()
    assert isinstance(result, ClassifyResponse)
    assert result.top.label == digit.label == reference["predictions"][0]["label"]
    assert result.top.probability == pytest.approx(reference["predictions"][0]["probability"], abs=1e-6)
    assert [p.index for p in result.predictions] == [p["index"] for p in reference["predictions"][:3]]
    assert result.model == "digits-vit" and len(result.request_id) == 32
    assert result.timings.total_ms >= result.timings.inference_ms > 0


def test_classify_accuracy_named_model_and_top_k(api: Any, digits: list[Any]) -> None:
    results = [api.classify(d.image, model="digits-vit-int8", top_k=2) for d in digits[:20]]
    assert all(r.model == "digits-vit-int8" and len(r.predictions) == 2 for r in results)
    assert all(r.predictions[0].probability >= r.predictions[1].probability for r in results)
    correct = sum(r.top.label == d.label for r, d in zip(results, digits[: len(results)], strict=True))
    assert correct >= 18  # 97.5% held-out accuracy


def test_classify_a_photo(api: Any, photos: dict[str, Image.Image], tmp_path: Path) -> None:
    path = tmp_path / "chelsea.jpg"
    photos["chelsea"].save(path, quality=90)
    by_path = api.classify(path, top_k=10)
    by_array = api.classify(np.asarray(photos["chelsea"]), top_k=10)
    for result in (by_path, by_array):  # a cat is no digit, but it is a valid image: ten labels, a distribution
        assert sorted(p.label for p in result.predictions) == [str(i) for i in range(10)]
        assert sum(p.probability for p in result.predictions) == pytest.approx(1.0, abs=1e-4)
    assert by_path.timings.decode_ms > 0


def test_classify_batch_with_a_bad_item(api: Any, digits: list[Any]) -> None:
    images = [d.image for d in digits[:6]]
    images.insert(3, b"these bytes are no image")
    batch = api.classify_batch(images, top_k=1)
    assert [item.index for item in batch.results] == list(range(7))
    bad = batch.results[3]
    assert not bad.ok and bad.error is not None and bad.error.code == "bad_image" and bad.predictions is None
    good = [item for item in batch.results if item.ok]
    assert len(good) == 6 and all(item.predictions is not None and len(item.predictions) == 1 for item in good)
    single = api.classify(digits[0].image, top_k=1)
    assert batch.results[0].predictions[0] == single.top  # the batch path gives the single path's answer
    with pytest.raises(ValueError, match="at least one"):
        api.classify_batch([])


def test_attention_json(api: Any, digits: list[Any]) -> None:
    rollout = api.attention(digits[0].image)
    assert isinstance(rollout, AttentionResponse) and rollout.method == "rollout"
    grid = rollout.to_numpy()
    assert grid.shape == (8, 8) and grid.dtype == np.float32
    assert grid.max() == pytest.approx(1.0) and grid.min() >= 0
    assert rollout.predictions[0].label == digits[0].label
    # Unset parameters are not sent: an explicit head_fusion next to a head would be refused (422).
    layer = api.attention(digits[0].image, method="layer", layer=-1, head=2)
    assert layer.params.layer == -1 and layer.params.head == 2 and layer.params.head_fusion is None
    assert not np.allclose(layer.to_numpy(), grid)
    fused = api.attention(digits[0].png, method="rollout", head_fusion="max", discard_ratio=0.5, top_k=2)
    assert fused.params.head_fusion == "max" and fused.params.discard_ratio == 0.5 and len(fused.predictions) == 2


def test_attention_batch_with_a_bad_item(api: Any, digits: list[Any]) -> None:
    images = [digits[0].image, b"these bytes are no image", digits[1].png]
    batch = api.attention_batch(images, method="layer", layer=-1, head=2, top_k=2)
    assert isinstance(batch, AttentionBatchResponse) and batch.method == "layer" and batch.params.head == 2
    assert [item.index for item in batch.results] == [0, 1, 2] and [item.ok for item in batch.results] == [
        True,
        False,
        True,
    ]
    bad = batch.results[1]
    assert bad.error is not None and bad.error.code == "bad_image" and bad.map is None
    with pytest.raises(ValueError, match="no map"):
        bad.to_numpy()
    single = api.attention(digits[0].image, method="layer", layer=-1, head=2, top_k=2)
    np.testing.assert_allclose(batch.results[0].to_numpy(), single.to_numpy(), atol=1e-4)
    assert [p.label for p in batch.results[0].predictions or []] == [p.label for p in single.predictions]
    with pytest.raises(NotFoundError, match="layer 99"):
        api.attention_batch([digits[0].image], method="layer", layer=99)
    with pytest.raises(ValueError, match="at least one"):
        api.attention_batch([])


def test_attention_png(api: Any, digits: list[Any], tmp_path: Path) -> None:
    faint = api.attention(digits[0].image, format="png", alpha=0.1, method="cls")
    strong = api.attention(digits[0].image, format="png", alpha=0.9, method="cls")
    assert isinstance(faint, AttentionPNG) and faint.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert faint.data != strong.data and faint.request_id
    out = tmp_path / "overlay.png"
    faint.save(out)
    with Image.open(out) as overlay:
        assert overlay.format == "PNG" and overlay.width > 100


def test_per_call_timeout_and_none_params_through_the_wire(connect: Any) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"\x89PNG\r\n\x1a\nfake", headers={"x-request-id": "abc"})

    sdk = connect("http://vitserve.test", transport=httpx.MockTransport(handler), timeout=7.0)
    png = sdk.attention(b"\x89PNG\r\n\x1a\n...", format="png", method="layer", layer=1)
    sdk.attention(b"GIF89a...", format="png", timeout=None)
    sdk.attention(b"GIF89a...", format="png", timeout=2.5)
    assert png.request_id == "abc"
    assert dict(seen[0].url.params) == {"method": "layer", "layer": "1", "format": "png"}
    assert [r.extensions["timeout"]["read"] for r in seen] == [7.0, None, 2.5]
    body = seen[1].read()
    assert b'name="file"; filename="image.gif"' in body and b"Content-Type: image/gif" in body


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSERVE_URL", "http://example.test:9000/")
    monkeypatch.setenv("VITSERVE_API_KEY", "s3cret")
    with Client() as sdk:
        assert sdk.base_url == "http://example.test:9000"
        assert sdk.headers["Authorization"] == "Bearer s3cret"
        assert sdk.timeout == 30.0  # finite by default
    with Client("http://other.test", api_key="k2", timeout=None) as sdk:
        assert sdk.base_url == "http://other.test" and sdk.headers["Authorization"] == "Bearer k2"
        assert sdk.timeout is None
    monkeypatch.delenv("VITSERVE_URL")
    monkeypatch.delenv("VITSERVE_API_KEY")
    with Client() as sdk:
        assert sdk.base_url == "http://127.0.0.1:8000" and "Authorization" not in sdk.headers


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost:8000", "gpu-box", "ftp://gpu-box/"])
def test_a_url_that_is_not_http_is_refused_at_once(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # `127.0.0.1:8000` parses as scheme "127.0.0.1": without this check, every call would fail on its own.
    with pytest.raises(ValueError, match=r"base_url '.*' is not an http:// or https:// URL") as caught:
        Client(url)
    if "://" not in url:
        assert f"did you mean http://{url}?" in str(caught.value)
    monkeypatch.setenv("VITSERVE_URL", url)
    with pytest.raises(ValueError, match=r"^\$VITSERVE_URL '.*' is not an http"):
        AsyncClient()


def test_async_client_runs_calls_concurrently(server: Any, digits: list[Any]) -> None:
    import asyncio

    async def main() -> list[ClassifyResponse]:
        async with AsyncClient(server.url) as sdk:
            return await asyncio.gather(*(sdk.classify(d.image) for d in digits[:8]))

    results = asyncio.run(main())
    assert len({r.request_id for r in results}) == 8
    assert sum(r.top.label == d.label for r, d in zip(results, digits[: len(results)], strict=True)) >= 7


def test_context_manager_closes_the_pool(server: Any) -> None:
    with Client(server.url) as sdk:
        assert sdk.health().ok
    with pytest.raises(RuntimeError):
        sdk.health()


def test_image_file_opened_in_text_mode_is_refused(api: Any, tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG")
    with path.open("r", encoding="latin-1") as f, pytest.raises(TypeError, match="binary mode"):
        api.classify(f)
    with pytest.raises(TypeError, match="cannot send list"):
        api.classify([1, 2, 3])


def test_relevance_for_a_class_by_index_or_label(api: Any, digits: list[Any]) -> None:
    top = api.attention(digits[2].image, method="relevance")
    assert top.method == "relevance" and top.target is not None
    assert top.target.label == top.predictions[0].label  # no target: the top prediction
    other = (top.target.index + 1) % 10
    by_index = api.attention(digits[2].image, method="relevance", target=other)
    by_label = api.attention(digits[2].png, method="relevance", target=str(other))
    assert by_index.target is not None and by_index.target.index == other
    np.testing.assert_allclose(by_index.to_numpy(), by_label.to_numpy())
    assert not np.allclose(by_index.to_numpy(), top.to_numpy())
    batch = api.attention_batch([digits[2].image, digits[3].png], method="relevance", target=other)
    assert [item.target.index for item in batch.results if item.target] == [other, other]
    np.testing.assert_allclose(batch.results[0].to_numpy(), by_index.to_numpy(), atol=1e-4)
    png = api.attention(digits[2].image, method="relevance", target=other, format="png")
    assert isinstance(png, AttentionPNG) and png.data.startswith(b"\x89PNG")
    with pytest.raises(InvalidParameterError, match="class index 0-9"):
        api.attention(digits[2].image, method="relevance", target=10)
    assert api.model("digits-vit").relevance and not api.model("digits-vit-int8").relevance
