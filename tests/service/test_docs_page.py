"""The API's interactive documentation (`/docs`, Swagger UI) comes from this server alone: the page names only
files of its own origin, each is served under the demo page's Content-Security-Policy, and in a real browser with
the network cut off the page renders every operation without a console error. ReDoc (`/redoc`) is not served.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, sync_playwright

from service.api.demo import CONTENT_SECURITY_POLICY
from service.api.docs import ASSETS
from service.core.runtime import ModelRepository
from tests.conftest import Server
from tests.service import inprocess

CHROMIUM = Path("/usr/bin/chromium")
TYPES = {".js": "text/javascript", ".css": "text/css"}


@pytest.fixture(scope="module")
def repo() -> ModelRepository:
    return inprocess.repository()


@pytest.fixture(scope="module")
def client(repo: ModelRepository) -> Iterator[TestClient]:
    with TestClient(inprocess.app(repo)) as c:
        yield c


def references(html: str) -> list[str]:
    """Every URL the page loads: `src` and `href` attributes."""
    return re.findall(r'(?:src|href)="([^"]*)"', html)


def test_docs_name_only_files_of_this_origin_and_each_is_served_under_the_csp(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "inline script"
    assert not re.search(r"\sstyle=|<style", page.text), "inline style"
    urls = references(page.text)
    files = [url for url in urls if url != "data:,"]  # the empty icon, as on the demo page
    assert files and all(url.startswith("/static/docs/") for url in files), urls
    assert {url.rsplit("/", 1)[1] for url in files} == set(ASSETS)  # the page loads every file served, no other
    for url in files:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"].startswith(TYPES[Path(url).suffix]), url
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    # No other origin in the start-up script either: the document it loads is this server's.
    code = re.sub(r"//[^\n]*", "", client.get("/static/docs/swagger-init.js").text)  # without its comments
    assert re.findall(r'url: "([^"]*)"', code) == ["/openapi.json"] and "http" not in code
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")  # what Swagger UI 5 reads


def test_only_the_listed_files_are_served_and_redoc_is_not(client: TestClient) -> None:
    for path in ["/static/docs/redoc.standalone.js", "/static/docs/..%2Fapp.js", "/static/docs/swagger.html"]:
        assert client.get(path).status_code == 404, path
    assert client.get("/redoc").status_code == 404


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (`make test` installs Debian's chromium for the browser tests)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def test_swagger_ui_renders_every_operation_offline_without_console_errors(browser: Browser, server: Server) -> None:
    context = browser.new_context()
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors: list[str] = []
    foreign: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r: Any) -> None:  # the network beyond this server is cut off: a CDN request fails and is noted
        if r.request.url.startswith(server.url):
            r.continue_()
        else:
            foreign.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(f"{server.url}/docs")
    operations = sum(len(ops) for ops in page.request.get(f"{server.url}/openapi.json").json()["paths"].values())
    page.wait_for_function(f"document.querySelectorAll('.opblock').length === {operations}")
    assert "vitserve" in page.locator(".info .title").inner_text()
    context.close()
    assert not foreign, foreign
    assert not errors, errors  # a CSP refusal is a console error too
