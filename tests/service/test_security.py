"""API keys, CORS, the limit on inference requests in progress, and what error bodies and the static route give
away: nothing of the server's files.

Most checks run the app in this process (a `TestClient`, or httpx's ASGI transport for concurrency); the SDK and
the log are checked against a real `python -m service` with keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import skimage.data
from fastapi.testclient import TestClient
from PIL import Image

from service.api import demo
from service.core.runtime import ModelRepository
from service.http.security import is_open
from service.route_table import is_admin
from service.settings import DEFAULT_OPEN_ROUTES, Settings
from tests.conftest import MODELS, Server, free_port, metric, run_cli, wait_until
from tests.service import inprocess
from tests.service.conftest import encode

KEYS = ["k1-0123456789abcdef", "k2-fedcba9876543210"]
ADMIN_KEY = "admin-0123456789abcdef"  # the repository extension's: API keys do not open it
PNG = encode(Image.fromarray(skimage.data.camera()).resize((32, 32)))
V2_BODY = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}


@pytest.fixture(scope="module")
def repo() -> ModelRepository:
    return inprocess.repository()


@pytest.fixture(scope="module")
def keyed(repo) -> Iterator[TestClient]:
    with TestClient(inprocess.app(repo, api_keys=KEYS, admin_keys=[ADMIN_KEY])) as c:
        yield c


def classify(client: TestClient | httpx.Client, **headers: str) -> Any:
    return client.post("/v1/classify", content=PNG, headers={"content-type": "image/png", **headers})


def assert_unauthorized(response: Any, *, v2: bool = False) -> str:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"] and response.headers["x-content-type-options"] == "nosniff"
    body = response.json()
    if v2:  # the Open Inference Protocol's error shape
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return str(body["error"])
    assert body["error"]["code"] == "unauthorized", body
    return str(body["error"]["message"])


# --- API keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/healthz", True),
        ("/healthz/x", False),
        ("/v2/health/ready", True),
        ("/v2/health", False),
        ("/", True),
        ("/static/app.js", True),
        ("/v1/models", False),
        ("/metricsx", False),
    ],
)
def test_open_routes_match_exact_paths_and_prefixes(path, expected):
    assert is_open(path, DEFAULT_OPEN_ROUTES) is expected


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/classify"),
        ("POST", "/v1/models/digits-vit/attention"),
        ("GET", "/v1/models"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/no-such-route"),  # 401, not 404: routes cannot be enumerated without a key
    ],
)
def test_protected_routes_need_a_key(keyed, method, path):
    message = assert_unauthorized(keyed.request(method, path, content=PNG, headers={"content-type": "image/png"}))
    assert "no API key was sent" in message and "Authorization: Bearer" in message


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v2"), ("GET", "/v2/models/digits-vit"), ("POST", "/v2/models/digits-vit/infer")],
)
def test_v2_routes_need_a_key_and_answer_in_the_protocol_shape(keyed, method, path):
    assert_unauthorized(keyed.request(method, path, json=V2_BODY), v2=True)
    response = keyed.request(method, path, json=V2_BODY, headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEYS[0]}"},
        {"Authorization": f"bearer {KEYS[1]}"},
        {"Authorization": f"Bearer   {KEYS[1]}  "},
        {"X-API-Key": KEYS[0]},
    ],
)
def test_every_configured_key_is_accepted_in_either_header(keyed, headers):
    response = classify(keyed, **headers)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEYS[0][:-1]}"},  # a prefix of a key
        {"Authorization": f"Bearer {KEYS[0]}x"},  # a key and more
        {"Authorization": f"Basic {KEYS[0]}"},  # not the bearer scheme
        {"X-API-Key": KEYS[0].upper()},
    ],
)
def test_a_wrong_key_is_refused_without_echoing_it(keyed, headers):
    response = classify(keyed, **headers)
    message = assert_unauthorized(response)
    assert not any(key in response.text for key in KEYS) and "wrong" not in response.text
    assert "not valid" in message or "no API key" in message


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics", "/"])
def test_probes_metrics_and_the_demo_page_are_open_by_default(keyed, path):
    assert keyed.get(path).status_code == 200


def test_the_demo_pages_files_are_open_but_its_api_calls_need_the_key(keyed):
    assert keyed.get("/static/app.js").status_code == 200
    assert keyed.get("/v1/models").status_code == 401


def test_refusals_are_counted_by_reason(keyed):
    def refused() -> float:
        return metric(keyed.get("/metrics").text, "vitserve_http_refused_total", reason="unauthorized")

    before = refused()
    classify(keyed)
    assert refused() == before + 1


def test_open_routes_add_to_the_defaults(repo):
    # Publishing the docs leaves every probe, the scrape and the demo page open: they are open whatever the setting.
    with TestClient(inprocess.app(repo, api_keys=KEYS, open_routes="/docs,/openapi.json")) as c:
        for path in ["/docs", "/openapi.json", "/healthz", "/readyz", "/v2/health/ready", "/metrics", "/"]:
            assert c.get(path).status_code == 200, path
        assert_unauthorized(c.get("/v1/models"))
        assert_unauthorized(classify(c))
    with TestClient(inprocess.app(repo, api_keys=KEYS, open_routes="")) as c:  # empty: the defaults alone
        assert c.get("/readyz").status_code == 200
        assert_unauthorized(c.get("/docs"))


def test_published_docs_load_whole_without_a_key(repo):
    # Swagger UI's files are below /static/, open like the demo page's: publishing the page and the document is
    # enough (service.api.docs).
    with TestClient(inprocess.app(repo, api_keys=KEYS, open_routes="/docs,/openapi.json")) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        files = re.findall(r'(?:src|href)="(/[^"]*)"', page.text)
        assert files and all(c.get(url).status_code == 200 for url in files), files
    with TestClient(inprocess.app(repo, api_keys=KEYS)) as c:  # unpublished: the page needs the key
        assert_unauthorized(c.get("/docs"))
        assert c.get("/docs", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200


def test_without_keys_nothing_needs_one(repo):
    with TestClient(inprocess.app(repo)) as c:
        assert classify(c).status_code == 200
        assert "www-authenticate" not in c.get("/v1/models").headers


def operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`METHOD /path` -> the OpenAPI operation."""
    return {f"{m.upper()} {path}": op for path, ops in schema["paths"].items() for m, op in ops.items()}


EITHER_KEY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]


def test_with_keys_the_openapi_document_declares_them_on_protected_operations_only(keyed):
    assert keyed.get("/openapi.json").status_code == 401  # the document itself is protected by default
    schema = keyed.get("/openapi.json", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    assert schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`X-API-Key: <key>`"},
    }
    ops = operations(schema)
    open_ops = {"GET /healthz", "GET /readyz", "GET /v2/health/live", "GET /v2/health/ready", "GET /metrics"}
    assert open_ops <= ops.keys()
    for name, op in ops.items():
        if name in open_ops:
            assert "security" not in op and "401" not in op["responses"], name
        else:
            assert op["security"] == EITHER_KEY, name
            assert "401" in op["responses"], name
    assert {"POST /v1/classify", "POST /v2/models/{name}/infer", "GET /v1/models"} <= ops.keys() - open_ops
    # What the document promises works: each declared scheme, used as the document says, is accepted.
    assert classify(keyed, Authorization=f"Bearer {KEYS[1]}").status_code == 200
    assert classify(keyed, **{"X-API-Key": KEYS[1]}).status_code == 200


def test_the_openapi_document_follows_the_configured_open_routes(repo):
    settings = {"api_keys": KEYS, "open_routes": "/healthz,/openapi.json,/docs,/v1/models/*"}
    with TestClient(inprocess.app(repo, **settings)) as c:
        assert c.get("/docs").status_code == 200  # published without a key
        ops = operations(c.get("/openapi.json").json())
    assert "security" not in ops["GET /v1/models/{name}"] and "security" not in ops["POST /v1/models/{name}/classify"]
    assert ops["GET /v1/models"]["security"] == EITHER_KEY  # `/v1/models/*` is below it, not it
    assert "security" not in ops["GET /readyz"]  # open by default, and the setting only adds to those


def test_without_keys_the_openapi_document_declares_no_scheme(repo):
    with TestClient(inprocess.app(repo)) as c:
        schema = c.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert not [name for name, op in operations(schema).items() if "security" in op or "401" in op["responses"]]


def test_keys_come_from_the_environment_and_a_file(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("# rotated 2024-05\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("VITSERVE_API_KEYS", "env-key-1, env-key-2")
    monkeypatch.setenv("VITSERVE_API_KEYS_FILE", str(path))
    assert Settings(model_dir=MODELS).api_keys == ["env-key-1", "env-key-2", "file-key-1", "file-key-2"]
    assert "env-key-1" not in repr(Settings(model_dir=MODELS))


@pytest.mark.parametrize(
    ("environment", "says"),
    [
        ({"VITSERVE_API_KEYS": "good-key,bad key"}, "printable ASCII"),
        ({"VITSERVE_API_KEYS_FILE": "{tmp}/missing"}, "cannot read the API keys file"),
        ({"VITSERVE_API_KEYS_FILE": "{tmp}/empty"}, "holds no keys"),
    ],
)
@pytest.mark.server
def test_bad_key_configuration_stops_the_start_without_printing_a_key(tmp_path, monkeypatch, environment, says):
    (tmp_path / "empty").write_text("# nothing yet\n")
    monkeypatch.setenv("VITSERVE_PORT", str(free_port()))
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    result = run_cli("-m", "service", timeout=60)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert "good-key" not in result.stderr and "bad key" not in result.stderr


# --- CORS ----------------------------------------------------------------------------------------------------

ORIGIN = "https://app.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization",
}


def test_cors_is_closed_by_default(keyed):
    response = keyed.get("/healthz", headers={"Origin": ORIGIN})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = keyed.options("/v1/classify", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origins_may_call_the_api_with_a_key(repo):
    with TestClient(inprocess.app(repo, api_keys=KEYS, cors_origins=f"{ORIGIN},https://other.example")) as c:
        preflight = c.options("/v1/classify", headers=PREFLIGHT)  # no key: a browser never sends one here
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        ok = classify(c, Origin=ORIGIN, Authorization=f"Bearer {KEYS[0]}")
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
        refused = classify(c, Origin=ORIGIN)  # the page can read why: the 401 carries the CORS headers too
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
        stranger = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers
        assert c.options("/v1/classify", headers={**PREFLIGHT, "Origin": "https://evil.example"}).status_code == 400


def test_cors_star_allows_any_origin(repo):
    with TestClient(inprocess.app(repo, cors_origins="*")) as c:
        assert (
            c.get("/healthz", headers={"Origin": "https://any.example"}).headers["access-control-allow-origin"] == "*"
        )


# --- concurrency limit ---------------------------------------------------------------------------------------


def test_requests_beyond_the_concurrency_limit_get_503_at_once(repo):
    # Two requests wait in the batch queue for a third (batches of 3, a minute's delay): they hold both slots
    # until the test adds the third image itself, past the HTTP limit.
    app = inprocess.app(repo, max_concurrent_requests=2, max_batch_size=3, max_queue_delay_ms=60_000)

    async def in_flight(c: httpx.AsyncClient) -> bool:
        # The two held requests, and this scrape of /metrics (never limited).
        return metric((await c.get("/metrics")).text, "vitserve_requests_in_flight") == 3

    async def third_image() -> None:
        state = app.state.vitserve
        model = state.models().models["digits-vit"]
        await state.infer(model, np.zeros((3, *model.meta.input_size), np.float32), with_attention=False)

    async def scenario() -> None:
        async with inprocess.serve(app) as c:
            post: dict[str, Any] = {"content": PNG, "headers": {"content-type": "image/png"}}
            held = [asyncio.create_task(c.post("/v1/classify", **post)) for _ in range(2)]
            await inprocess.eventually(lambda: in_flight(c), "two requests hold both slots")
            refused = await c.post("/v1/classify", **post)
            assert not any(task.done() for task in held), "refused at once, not after waiting for a slot"
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert refused.json()["error"]["code"] == "overloaded"
            assert "VITSERVE_MAX_CONCURRENT_REQUESTS" in refused.json()["error"]["message"]
            v2 = await c.post("/v2/models/digits-vit/infer", json=V2_BODY)
            assert v2.status_code == 503 and isinstance(v2.json()["error"], str)
            for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):  # never limited
                assert (await c.get(path)).status_code == 200, path
            assert not any(task.done() for task in held)
            await third_image()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            again = [c.post("/v1/classify", **post) for _ in range(2)]  # slots are given back
            assert [r.status_code for r in (await asyncio.gather(*again, third_image()))[:2]] == [200, 200]

    asyncio.run(scenario())


# --- nothing of the server's files leaves it -----------------------------------------------------------------


def test_an_internal_failure_is_a_500_without_traceback_or_paths(repo, monkeypatch):
    model = repo.models["digits-vit"]

    def broken(*args, **kwargs):
        raise RuntimeError(f"segment fault near {Path(__file__).resolve()} in {os.getcwd()}")

    monkeypatch.setattr(model, "infer", broken)

    async def scenario() -> list[httpx.Response]:
        async with inprocess.serve(inprocess.app(repo), raise_app_exceptions=False) as c:
            post: dict[str, Any] = {"content": PNG, "headers": {"content-type": "image/png"}}
            return [
                await c.post("/v1/classify", **post),
                await c.post("/v1/attention", **post),
                await c.post("/v2/models/digits-vit/infer", json=V2_BODY),
            ]

    rest, attention, v2 = asyncio.run(scenario())
    for response in (rest, attention, v2):
        assert response.status_code == 500, response.text
        for leak in ("Traceback", "RuntimeError", "segment fault", "/work", "/tmp", str(Path(__file__).parent), ".py"):
            assert leak not in response.text, (leak, response.text)
        assert response.headers["x-request-id"] in response.text  # quoted, so the log line can be found
        assert response.headers["x-content-type-options"] == "nosniff"
    assert rest.json()["error"]["code"] == "internal_error"
    assert isinstance(v2.json()["error"], str)


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2Fapp.py",
        "/static/%2e%2e%2f%2e%2e%2fsettings.py",
        "/static/%2Fetc%2Fpasswd",
        "/static/%2e%2e",
        "/static/..%5C..%5Capp.py",
        "/static/index.html%00.js",
        "/static/app.py",
    ],
)
def test_static_route_serves_no_path_a_client_names(keyed, path):
    response = keyed.get(path)
    assert response.status_code == 404, response.text
    assert "import" not in response.text and "root:" not in response.text


def test_static_route_does_not_follow_symlinks(keyed, tmp_path, monkeypatch):
    static = tmp_path / "static"
    static.mkdir()
    (static / "ok.js").write_text("console.log('ok');\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("api-key-material\n")
    (static / "leak.js").symlink_to(secret)
    (static / "leak2.css").symlink_to(Path(demo.__file__).resolve())
    monkeypatch.setattr(demo, "STATIC", static)
    assert keyed.get("/static/ok.js").status_code == 200
    for name in ("leak.js", "leak2.css"):
        response = keyed.get(f"/static/{name}")
        assert response.status_code == 404 and "api-key-material" not in response.text and "import" not in response.text


# Names a request may give for a file: relative climbs, absolute paths, encoded slashes and dots, backslashes,
# a NUL; each aimed at a file the server can read (its own source, its model files, the system's users).
TRAVERSALS = [
    "../../../../../../etc/passwd",
    "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fservice%2fsettings.py",
    "..%2F..%2Fmodels%2Fdigits-vit%2Fartifact.json",
    "..%5C..%5Cservice%5Capp.py",
    "....%2F%2F....%2F%2Fetc%2Fpasswd",
    "settings.py%00.js",
]
# What would show that a file was served: the users file, this package's source, an artifact's record.
LEAKS = ["root:", "BaseSettings", "import ", '"graphs"']


def test_no_route_serves_a_file_named_in_its_path(keyed):
    """Every route with a path parameter, each parameter given each traversal: 404, and no file's content."""
    auth = {"Authorization": f"Bearer {KEYS[0]}", "content-type": "image/png"}
    documented = keyed.app.openapi()["paths"]
    # The API document lists every API route; the demo page's static route stays out of it.
    routes = [(m.upper(), t) for t, operations in documented.items() if "{" in t for m in operations]
    routes.append(("GET", "/static/{name}"))
    assert len(routes) >= 11, routes  # the model routes of /v1 and /v2, and /static
    for method, template in routes:
        for value in TRAVERSALS:
            path = template
            for parameter in re.findall(r"\{\w+\}", template):
                path = path.replace(parameter, value)
            # The path the server sees (the client removes dot segments) says which key and body its route takes.
            admin = is_admin(httpx.URL(f"http://x{path}").path)
            headers = {**auth, "Authorization": f"Bearer {ADMIN_KEY if admin else KEYS[0]}"}
            response = keyed.request(method, path, content=b"{}" if admin else PNG, headers=headers)
            # No such model or file; or, where the path still matches, system shared memory refused (off by
            # default) before any name is read.
            expected = {403, 404} if template.startswith("/v2/systemsharedmemory/") else {404}
            assert response.status_code in expected, (method, path, response.status_code)
            for leak in LEAKS:
                assert leak not in response.text, (method, path, leak, response.text[:200])


def test_the_service_has_no_http_client_so_no_route_can_fetch_a_url():
    """A source audit: no module of the service imports an HTTP client (so nothing a request says is fetched)."""
    root = Path(demo.__file__).resolve().parents[1]
    for path in root.rglob("*.py"):
        source = path.read_text()
        for forbidden in ("import httpx", "import requests", "urllib.request", "urlopen", "import aiohttp"):
            assert forbidden not in source, f"{path.name} uses {forbidden}"


# --- the real process with keys: the SDK, and keys kept out of the log ----------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> Iterator[Server]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys"
    keys_file.write_text(f"{KEYS[1]}\n")
    srv = Server(
        MODELS,
        tmp_path_factory.mktemp("keyed") / "server.log",
        VITSERVE_API_KEYS=KEYS[0],
        VITSERVE_API_KEYS_FILE=str(keys_file),
        VITSERVE_MODELS=json.dumps(["digits-vit"]),
        VITSERVE_LOG_LEVEL="debug",  # the most the log ever says: still no key in it
    ).wait_ready()
    yield srv
    srv.stop()


@pytest.mark.server
def test_the_sdk_sends_its_key_and_raises_authentication_error_without_one(keyed_server, monkeypatch):
    from vitserve_client import AuthenticationError, Client

    monkeypatch.delenv("VITSERVE_API_KEY", raising=False)
    for key in KEYS:
        with Client(keyed_server.url, api_key=key, max_retries=0) as client:
            assert client.classify(PNG).model == "digits-vit"
            assert client.models().default == "digits-vit"
    for wrong in (None, "not-a-key"):
        with Client(keyed_server.url, api_key=wrong, max_retries=0) as client:
            assert client.health().status == "ok"  # open
            with pytest.raises(AuthenticationError) as caught:
                client.classify(PNG)
            assert caught.value.status == 401 and caught.value.code == "unauthorized"
    monkeypatch.setenv("VITSERVE_API_KEY", KEYS[0])  # the SDK's environment variable
    with Client(keyed_server.url, max_retries=0) as client:
        assert client.classify(PNG).predictions


@pytest.mark.server
def test_keys_never_reach_the_log(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as c:
        assert classify(c, Authorization=f"Bearer {KEYS[0]}").status_code == 200
        assert classify(c, Authorization="Bearer wrong-key-attempt").status_code == 401
        assert classify(c, **{"X-API-Key": KEYS[1], "X-Request-ID": "keys-never-logged"}).status_code == 200
    # Access lines are written a moment later (service.obs.logs.FLUSH_INTERVAL_S), in order: wait for the last one.
    wait_until(lambda: "[keys-never-logged]" in keyed_server.log.read_text(), "the last request's access line")
    log = keyed_server.log.read_text()
    for secret in (*KEYS, "wrong-key-attempt"):
        assert secret not in log
