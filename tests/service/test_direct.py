"""V2 `infer` answered by the connection layer (service.http.fast_path.DirectInfer) against a real server.

The direct path must be indistinguishable from the ASGI one: the same status, body and headers for good and
bad requests, the same keys, limits, metrics and access log. A query string sends the very same request the
ASGI way (the direct path takes plain paths only), so each comparison is one server, two ways in.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from service.api.inference import DEFAULT_TOP_K
from service.app import create_app
from service.http.fast_path import DIRECT_MAX_BODY, direct_target
from service.settings import Settings
from tests.conftest import MODELS, Server
from tests.service.rawhttp import RawResponse, Reader, connect, metric, request_bytes, wait_for

pytestmark = pytest.mark.server

KEY = "direct-test-key"
INFER = "/v2/models/digits-vit/infer"
BODY_TIMEOUT_S = 2.0


def pixels_request(n: int = 1, *, outputs: list[str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary V2 request of `n` random pixel tensors: body and headers."""
    values = np.random.default_rng(n).normal(size=(n, 3, 32, 32)).astype(np.float32)
    header: dict = {
        "inputs": [
            {
                "name": "pixel_values",
                "shape": [n, 3, 32, 32],
                "datatype": "FP32",
                "parameters": {"binary_data_size": values.nbytes},
            }
        ]
    }
    if outputs is not None:
        header["outputs"] = [{"name": o} for o in outputs]
    head = json.dumps(header).encode()
    return head + values.tobytes(), {
        "inference-header-content-length": str(len(head)),
        "content-type": "application/octet-stream",
    }


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        MODELS,
        tmp_path_factory.mktemp("direct") / "server.log",
        VITSERVE_API_KEYS=KEY,
        VITSERVE_LOG_LEVEL="info",  # the access log
        VITSERVE_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    ).wait_ready()
    yield srv
    assert srv.stop() == 0


def exchange(port: int, path: str, body: bytes, headers: dict[str, str]) -> RawResponse:
    with connect(port) as sock:
        sock.sendall(request_bytes("POST", path, body, headers))
        return Reader(sock).response()


def both_ways(port: int, body: bytes, headers: dict[str, str]) -> tuple[RawResponse, RawResponse]:
    """The same request, direct and (through a query string) the ASGI way."""
    return exchange(port, INFER, body, headers), exchange(port, INFER + "?via=asgi", body, headers)


def comparable(response: RawResponse) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k not in {"date", "x-request-id"}}
    return response.status, headers, response.body


def test_the_direct_path_is_on_by_default_and_off_with_cors() -> None:
    assert create_app(Settings(model_dir=MODELS)).state.direct is not None
    assert create_app(Settings(model_dir=MODELS, cors_origins=["https://example.com"])).state.direct is None
    assert create_app(Settings(model_dir=MODELS, direct_infer=False)).state.direct is None


BAD_BODIES = {
    "not json": (b"{nope", {"content-type": "application/json"}),
    "unknown input": (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', {}),
    "wrong shape": (
        b'{"inputs": [{"name": "pixel_values", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}',
        {},
    ),
    "NaN pixels": (
        b'{"inputs": [{"name": "pixel_values", "shape": [1, 1], "datatype": "FP32", "data": ["NaN"]}]}',
        {},
    ),
}


@pytest.mark.parametrize("case", ["pixels", "outputs", "batch", *BAD_BODIES])
def test_direct_and_asgi_answers_are_the_same(keyed: Server, case: str) -> None:
    if case in BAD_BODIES:
        body, headers = BAD_BODIES[case]
    else:
        body, headers = pixels_request(
            3 if case == "batch" else 1, outputs=["probabilities", "attention_rollout"] if case == "outputs" else None
        )
    headers = {**headers, "authorization": f"Bearer {KEY}"}
    direct, asgi = both_ways(keyed.port, body, headers)
    assert comparable(direct) == comparable(asgi)
    assert (direct.status == 200) == (case not in BAD_BODIES), direct.body
    assert direct.headers["x-content-type-options"] == "nosniff"


def test_unknown_models_and_missing_keys_are_answered_alike(keyed: Server) -> None:
    body, headers = pixels_request()
    for path in ("/v2/models/nope/infer", "/v2/models/digits-vit/versions/9/infer"):
        direct = exchange(keyed.port, path, body, {**headers, "x-api-key": KEY})
        asgi = exchange(keyed.port, path + "?via=asgi", body, {**headers, "x-api-key": KEY})
        assert direct.status == 404 and comparable(direct) == comparable(asgi)
    for credentials in ({}, {"authorization": "Bearer wrong"}):
        direct, asgi = both_ways(keyed.port, body, {**headers, **credentials})
        assert direct.status == 401 and direct.headers["www-authenticate"] == "Bearer"
        assert comparable(direct) == comparable(asgi)
    ok = exchange(keyed.port, INFER, body, {**headers, "x-api-key": KEY})
    assert ok.status == 200


def test_request_ids_metrics_and_access_log(keyed: Server) -> None:
    body, headers = pixels_request()
    headers["authorization"] = f"Bearer {KEY}"
    route = {"route": "/v2/models/{name}/infer", "method": "POST", "status": "200"}
    before = metric(keyed.url, "vitserve_http_requests", **route)
    success = metric(keyed.url, "nv_inference_request_success", model="digits-vit")
    given = exchange(keyed.port, INFER, body, {**headers, "x-request-id": "trace-me-42"})
    assert given.status == 200 and given.headers["x-request-id"] == "trace-me-42"
    made = exchange(keyed.port, INFER, body, {**headers, "x-request-id": "no spaces allowed"})
    assert made.status == 200 and len(made.headers["x-request-id"]) == 32
    assert metric(keyed.url, "vitserve_http_requests", **route) == before + 2
    assert exchange(keyed.port, INFER + "?via=asgi", body, headers).status == 200  # labelled alike
    assert metric(keyed.url, "vitserve_http_requests", **route) == before + 3
    versioned = {**route, "route": "/v2/models/{name}/versions/{version}/infer"}
    for path in ("/v2/models/digits-vit/versions/1/infer", "/v2/models/digits-vit/versions/1/infer?via=asgi"):
        assert exchange(keyed.port, path, body, headers).status == 200
    assert metric(keyed.url, "vitserve_http_requests", **versioned) == 2
    assert metric(keyed.url, "nv_inference_request_success", model="digits-vit") == success + 5
    assert metric(keyed.url, "vitserve_requests_in_flight") == 1  # the scrape itself
    wait_for("the access log line", lambda: f'"POST {INFER} HTTP/1.1" 200' in keyed.log.read_text())


def test_pipelined_requests_are_answered_in_order(keyed: Server) -> None:
    body, headers = pixels_request()
    headers["authorization"] = f"Bearer {KEY}"
    infer = request_bytes("POST", INFER, body, headers)
    health = request_bytes("GET", "/healthz")
    with connect(keyed.port) as sock:
        sock.sendall(infer + infer + health + infer)  # one write: the server parses them back to back
        reader = Reader(sock)
        answers = [reader.response() for _ in range(4)]
    assert [a.status for a in answers] == [200, 200, 200, 200]
    assert [b"logits" in a.body for a in answers] == [True, True, False, True]


def test_a_body_that_does_not_keep_pace_gets_408_and_is_closed(keyed: Server) -> None:
    body, headers = pixels_request()
    head = request_bytes("POST", INFER, body, {**headers, "authorization": f"Bearer {KEY}"})
    before = metric(keyed.url, "vitserve_http_connections_shed", reason="body_timeout")
    with connect(keyed.port, timeout=BODY_TIMEOUT_S + 30) as sock:
        sock.sendall(head[: len(head) - len(body) + 100])  # headers and 100 of 12,5xx bytes, then nothing
        reader = Reader(sock)
        response = reader.response()
        assert response.status == 408 and response.headers["connection"] == "close"
        assert "VITSERVE_BODY_TIMEOUT_S" in json.loads(response.body)["error"]  # V2's error shape: a message
        assert reader.closed()
    assert metric(keyed.url, "vitserve_http_connections_shed", reason="body_timeout") == before + 1
    assert metric(keyed.url, "vitserve_memory_budget_used_bytes", budget="body") == 0


def test_large_and_chunked_bodies_go_the_asgi_way(keyed: Server) -> None:
    """Past DIRECT_MAX_BODY, or chunked: the middleware streams them, with the same answers."""
    n = DIRECT_MAX_BODY // (3 * 32 * 32 * 4) + 1
    body, headers = pixels_request(n)
    assert len(body) > DIRECT_MAX_BODY
    large = exchange(keyed.port, INFER, body, {**headers, "x-api-key": KEY})
    assert large.status == 413 and "VITSERVE_MAX_BATCH_FILES" in large.body.decode()  # n > 32 images
    small, headers = pixels_request()
    chunked_head = (
        f"POST {INFER} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nx-api-key: {KEY}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode()
    with connect(keyed.port) as sock:
        sock.sendall(chunked_head + b"%x\r\n" % len(small) + small + b"\r\n0\r\n\r\n")
        assert Reader(sock).response().status == 200


def test_client_gone_mid_body_frees_what_it_held(keyed: Server) -> None:
    body, headers = pixels_request()
    raw = request_bytes("POST", INFER, body, {**headers, "authorization": f"Bearer {KEY}"})
    sock = socket.create_connection(("127.0.0.1", keyed.port))
    sock.sendall(raw[: len(raw) - 10])
    wait_for("the body reservation", lambda: metric(keyed.url, "vitserve_memory_budget_used_bytes", budget="body") > 0)
    sock.close()
    wait_for(  # at once, not at the body deadline (which would also answer a 408 to nobody)
        "the reservation to be released",
        lambda: metric(keyed.url, "vitserve_memory_budget_used_bytes", budget="body") == 0,
        timeout=BODY_TIMEOUT_S / 2,
    )
    assert metric(keyed.url, "vitserve_requests_in_flight") == 1  # the scrape itself
    assert exchange(keyed.port, INFER, body, {**headers, "x-api-key": KEY}).status == 200


# --- /v1/classify -----------------------------------------------------------------------------------------------


def test_which_requests_the_direct_path_takes() -> None:
    """Plain infer and classify targets; classify with `top_k` in FastAPI's bounds and nothing else in its query
    (any other query, a bad `top_k` or a %-escape is answered the ASGI way, whose validation words it)."""
    taken = {
        b"/v2/models/digits-vit/infer": "/v2/models/{name}/infer",
        b"/v2/models/digits-vit/versions/1/infer": "/v2/models/{name}/versions/{version}/infer",
        b"/v1/classify": "/v1/classify",
        b"/v1/classify?top_k=1000": "/v1/classify",
        b"/v1/models/digits-vit/classify?top_k=3": "/v1/models/{name}/classify",
    }
    for url, template in taken.items():
        target = direct_target(url)
        assert target is not None and target.template == template, url
    assert direct_target(b"/v1/classify?top_k=7").k == 7  # type: ignore[union-attr]
    assert direct_target(b"/v1/classify").k == DEFAULT_TOP_K  # type: ignore[union-attr]
    for url in (
        b"/v1/classify?top_k=0",
        b"/v1/classify?top_k=1001",
        b"/v1/classify?top_k=03",
        b"/v1/classify?top_k=3&via=asgi",
        b"/v1/classify?via=asgi",
        b"/v1/models/digits%2Dvit/classify",
        b"/v1/classify/batch",
        b"/v1/attention",
        b"/v2/models/digits-vit/infer?via=asgi",
    ):
        assert direct_target(url) is None, url


def multipart(data: bytes, field: str = "file", filename: str = "digit.png") -> tuple[bytes, dict[str, str]]:
    boundary = "vitserve-direct-test"
    body = (
        (
            f'--{boundary}\r\ncontent-disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"content-type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def classify_comparable(response: RawResponse) -> tuple[int, dict[str, str], object]:
    """Status, headers and body, less what differs between any two answers (timings; the id, checked apart)."""
    status, headers, body = comparable(response)
    answer = json.loads(body)
    if "request_id" in answer:
        assert answer.pop("request_id") == response.headers["x-request-id"]
    answer.pop("timings", None)
    headers.pop("content-length", None)  # timings' digits vary
    return status, headers, answer


def test_classify_direct_and_asgi_answers_are_the_same(keyed: Server, held_out_pngs: list[bytes]) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    png = held_out_pngs[3]
    cases = {
        "multipart": (*multipart(png), "?top_k=3"),
        "raw image": (png, {"content-type": "image/png"}, ""),
        "no file field": (*multipart(png, field="image"), "?top_k=3"),
        "not an image": (*multipart(b"plain text"), ""),
        "malformed multipart": (b"--x\r\nnonsense", {"content-type": "multipart/form-data; boundary=x"}, ""),
        "wrong boundary": (multipart(png)[0], {"content-type": "multipart/form-data; boundary=other"}, ""),
        "part without a name": (
            b'--x\r\ncontent-disposition: form-data; filename="a.png"\r\n\r\n' + png + b"\r\n--x--\r\n",
            {"content-type": "multipart/form-data; boundary=x"},
            "",
        ),
        "unsupported type": (png, {"content-type": "text/plain"}, ""),
    }
    for case, (body, headers, query) in cases.items():
        for path in ("/v1/classify", "/v1/models/digits-vit/classify", "/v1/models/nope/classify"):
            direct = exchange(keyed.port, path + query, body, {**headers, **auth})
            asgi = exchange(keyed.port, path + (query + "&" if query else "?") + "via=asgi", body, {**headers, **auth})
            assert classify_comparable(direct) == classify_comparable(asgi), (case, path)
            good = case in ("multipart", "raw image") and "nope" not in path
            assert (direct.status == 200) == good, (case, path, direct.body)
    body, headers = multipart(png)
    answer = json.loads(exchange(keyed.port, "/v1/classify?top_k=3", body, {**headers, **auth}).body)
    assert len(answer["predictions"]) == 3 and answer["timings"]["batch_size"] >= 1
    unauthorized = exchange(keyed.port, "/v1/classify", png, {"content-type": "image/png"})
    assert unauthorized.status == 401


def test_classify_metrics_and_access_log(keyed: Server, held_out_pngs: list[bytes]) -> None:
    route = {"route": "/v1/models/{name}/classify", "method": "POST", "status": "200"}
    before = metric(keyed.url, "vitserve_http_requests", **route)
    body, headers = multipart(held_out_pngs[0])
    headers["x-api-key"] = KEY
    for query in ("?top_k=2", "?top_k=2&via=asgi"):
        assert exchange(keyed.port, "/v1/models/digits-vit/classify" + query, body, headers).status == 200
    assert metric(keyed.url, "vitserve_http_requests", **route) == before + 2
    wait_for(
        "the access log line",
        lambda: '"POST /v1/models/digits-vit/classify?top_k=2 HTTP/1.1" 200' in keyed.log.read_text(),
    )
