"""Every exception class, from real server answers where the server can produce them."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import vitserve_client
from PIL import Image
from vitserve_client import errors
from vitserve_client._core import USE_CLIENT_DEFAULT, Call
from vitserve_client._images import to_upload
from vitserve_client.errors import (
    APIError,
    AuthenticationError,
    BadImageError,
    BadRequestError,
    InvalidParameterError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    ServerError,
    TransportError,
    UnexpectedResponseError,
    UnsupportedMediaTypeError,
    VitserveError,
)

from tests.client.scripted import Reply

API_ERRORS = [
    BadImageError,
    BadRequestError,
    AuthenticationError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    InvalidParameterError,
    OverloadedError,
    ServerError,
]


def test_the_tree_is_as_drawn() -> None:
    assert issubclass(TransportError, VitserveError) and not issubclass(TransportError, APIError)
    assert issubclass(APIError, VitserveError)
    for cls in (TransportError, UnexpectedResponseError, APIError):
        assert cls.__bases__ == (VitserveError,) and f"── {cls.__name__}" in (errors.__doc__ or "")
    for cls in API_ERRORS:
        assert cls.__bases__ == (APIError,), cls
        assert f"── {cls.__name__}" in (errors.__doc__ or ""), f"{cls.__name__} missing from the drawn tree"
        assert getattr(vitserve_client, cls.__name__) is cls


def _check(error: APIError, cls: type[APIError], status: int, code: str) -> None:
    assert type(error) is cls
    assert (error.status, error.code) == (status, code)
    assert error.message and str(error).startswith(f"{status} {code}: ")
    assert error.response is not None and error.response.status_code == status
    assert error.request is not None and error.request.url.path.startswith("/v1/")
    assert error.request_id == error.response.headers["x-request-id"] and len(error.request_id) == 32


def test_bad_image(api: Any) -> None:
    with pytest.raises(BadImageError) as caught:
        api.classify(b"\x89PNG\r\n\x1a\n but then nothing of a PNG")
    _check(caught.value, BadImageError, 400, "bad_image")
    with pytest.raises(BadImageError, match="empty"):
        api.attention(b"")


def test_bad_request(api: Any) -> None:
    # The SDK always sends field 'file'; a hand-made call through the same core sends another field.
    wrong_field = Call("POST", "/v1/classify", lambda r: r, files=[("picture", to_upload(b"GIF89a"))])
    with pytest.raises(BadRequestError) as caught:
        api._send(wrong_field, USE_CLIENT_DEFAULT)
    _check(caught.value, BadRequestError, 400, "bad_request")
    assert "'file' is missing" in caught.value.message


def test_not_found(api: Any, digits: list[Any]) -> None:
    with pytest.raises(NotFoundError) as caught:
        api.classify(digits[0].image, model="no-such-model")
    _check(caught.value, NotFoundError, 404, "not_found")
    assert caught.value.detail == {"available": ["digits-vit", "digits-vit-int8"]}
    with pytest.raises(NotFoundError, match="layer 9"):
        api.attention(digits[0].image, method="layer", layer=9)
    with pytest.raises(NotFoundError):
        api.model("no-such-model")


def test_unsupported_media_type(api: Any, digits: list[Any]) -> None:
    ico = io.BytesIO()
    Image.fromarray(digits[0].image).save(ico, format="ICO")  # Pillow reads ICO, the server refuses it
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        api.classify(ico.getvalue())
    _check(caught.value, UnsupportedMediaTypeError, 415, "unsupported_media_type")
    assert caught.value.detail["format"] == "ICO"


def test_invalid_parameter(api: Any, digits: list[Any]) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        api.classify(digits[0].image, top_k=0)
    _check(caught.value, InvalidParameterError, 422, "invalid_parameter")
    assert caught.value.detail[0]["where"] == "query.top_k"
    with pytest.raises(InvalidParameterError, match="discard_ratio"):
        api.attention(digits[0].image, discard_ratio=1.5)
    with pytest.raises(InvalidParameterError, match="applies to method 'layer'"):
        api.attention(digits[0].image, method="rollout", head=1)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.conftest import MODELS, Server

    srv = Server(
        MODELS,
        tmp_path_factory.mktemp("small") / "server.log",
        VITSERVE_MAX_BODY_BYTES="4000",
        VITSERVE_MAX_BATCH_FILES="2",
        VITSERVE_MODELS='["digits-vit"]',
    ).wait_ready()
    yield srv
    srv.stop()


@pytest.mark.server
def test_payload_too_large(connect: Any, small_server: Any, photos: dict[str, Image.Image], digits: list[Any]) -> None:
    sdk = connect(small_server.url)
    with pytest.raises(PayloadTooLargeError) as caught:
        sdk.classify(photos["chelsea"])
    _check(caught.value, PayloadTooLargeError, 413, "payload_too_large")
    assert caught.value.detail == {"limit_bytes": 4000}
    with pytest.raises(PayloadTooLargeError, match="the limit is 2"):
        sdk.classify_batch([d.image for d in digits[:3]])
    assert sdk.classify(digits[0].image).top.label == digits[0].label  # small requests still pass


def test_authentication_error_from_an_injected_transport(connect: Any) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = {"error": {"code": "unauthorized", "message": "wrong API key", "detail": None}}
        return httpx.Response(401, json=body, headers={"x-request-id": "req-401"})

    sdk = connect("http://vitserve.test", api_key="wrong", transport=httpx.MockTransport(handler))
    with pytest.raises(AuthenticationError) as caught:
        sdk.models()
    error = caught.value
    assert (error.status, error.code, error.message, error.request_id) == (
        401,
        "unauthorized",
        "wrong API key",
        "req-401",
    )
    assert len(seen) == 1 and seen[0].headers["authorization"] == "Bearer wrong"  # never retried


def test_non_json_error_body(connect: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    sdk = connect("http://vitserve.test", transport=httpx.MockTransport(handler))
    with pytest.raises(ServerError) as caught:
        sdk.health()
    assert caught.value.code == "http_502" and "Bad Gateway" in caught.value.message
    assert caught.value.request_id is None


def test_transport_error_on_a_closed_port(connect: Any) -> None:
    from tests.conftest import free_port

    sdk = connect(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff=0.01)
    with pytest.raises(TransportError) as caught:
        sdk.health()
    error = caught.value
    assert isinstance(error.__cause__, httpx.ConnectError)
    assert error.request is not None and error.request.url.path == "/healthz"
    assert "3 attempts" in str(error) and "is the server running" in str(error)


def test_timeouts_are_transport_errors_and_not_retried(connect: Any) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ReadTimeout("slow", request=request)

    sdk = connect("http://vitserve.test", transport=httpx.MockTransport(handler))
    with pytest.raises(TransportError, match="timed out"):
        sdk.health()
    assert calls == 1


def test_a_success_that_is_not_vitserve(connect: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"not": "a png"})

    sdk = connect("http://vitserve.test", transport=httpx.MockTransport(handler))
    with pytest.raises(UnexpectedResponseError, match="not a ModelList") as caught:
        sdk.models()
    assert caught.value.response.status_code == 200 and caught.value.request.url.path == "/v1/models"
    assert "is http://vitserve.test a vitserve server of a compatible version?" in str(caught.value)
    with pytest.raises(UnexpectedResponseError, match="application/json, not a PNG"):
        sdk.attention(b"GIF89a", format="png")


NGINX = b"<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head><body>...</body></html>"


@pytest.mark.parametrize("status", [200, 401, 404, 405, 500, 501])
def test_an_html_page_says_the_server_is_not_vitserve(connect: Any, scripted: Any, status: int) -> None:
    # Another web server, a portal or a proxy with no route: whatever the status, the page is not an API error
    # (whose message would be a page of markup), nor a body that failed to parse.
    scripted.script(Reply(status, NGINX, content_type="text/html; charset=utf-8"))
    sdk = connect(scripted.url, max_retries=0)
    with pytest.raises(UnexpectedResponseError) as caught:
        sdk.classify(b"GIF89a")
    message = str(caught.value)
    assert f"POST {scripted.url}/v1/classify answered {status} with an HTML page titled 'Welcome to nginx!'" in message
    assert f"the server at {scripted.url} is not vitserve" in message and "<html" not in message
    assert caught.value.response.status_code == status


def test_html_is_recognised_without_its_content_type(connect: Any, scripted: Any) -> None:
    scripted.script(Reply(404, b"  <html><body>Not here</body></html>", content_type="text/plain"))
    with pytest.raises(UnexpectedResponseError, match="answered 404 with an HTML page: the server at"):
        connect(scripted.url).health()


@pytest.mark.parametrize(("status", "cls"), [(502, ServerError), (503, OverloadedError), (504, ServerError)])
def test_a_gateways_html_page_keeps_its_status(connect: Any, scripted: Any, status: int, cls: type[APIError]) -> None:
    # A proxy's 502/503/504 page speaks for the server behind it (down, restarting, too slow): a 503 is retried.
    scripted.script(Reply(status, b"<html><title>Bad Gateway</title></html>", content_type="text/html"))
    with pytest.raises(cls) as caught:
        connect(scripted.url, max_retries=1, backoff=0.001, max_backoff=0.001).health()
    assert caught.value.status == status
    assert len(scripted.seen) == (2 if status == 503 else 1)
