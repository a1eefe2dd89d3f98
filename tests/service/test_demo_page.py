"""The demo page (`GET /`) in a real browser: Debian's Chromium, headless, driven by Playwright.

Every browser test loads the page from the real server (the `server` fixture) and works it as a person would:
pick a held-out digit canvas, switch attention methods, draw a digit with the mouse, upload a text file, shrink
the window to a phone's width. What the page shows is checked against the server's own answers, the network
requests the page makes are counted, and the attention canvas is read back pixel by pixel.

Screenshots land in test-artifacts/demo/ (gitignored). `VITSERVE_DOCS_SCREENSHOT=1` also writes the README's
docs/images/demo.png, so an ordinary run never changes a tracked file.

No `playwright install`: the browser is Debian's `chromium` package (`make test` installs it when
/usr/bin/chromium is missing). Without it, and only then, the browser tests skip.
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, Route, sync_playwright

from model_export import digits
from service.api.demo import CONTENT_SECURITY_POLICY
from tests.conftest import MODELS, ROOT, Server
from tests.service.conftest import canvas_image, classify, encode, top_label

CHROMIUM = Path("/usr/bin/chromium")
APP_JS = ROOT / "service" / "static" / "app.js"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "demo"
DOCS_SCREENSHOT = ROOT / "docs" / "images" / "demo.png"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 740}
TIMEOUT_MS = 30_000  # two shared CPU cores: a first request can take a while
# A "7" in pad coordinates (0..1): a top bar and a slanted stem, about two thirds of the pad. Checked by hand
# and by this test: the default model calls it a 7 with about 90% probability at any brush from 20 to 28.
SEVEN = [(0.30, 0.20), (0.72, 0.20), (0.45, 0.82)]
# Records the URL of every answer body the page has read, in `window.answered`. The page's own code awaits the
# promise this returns, so once a URL is listed, the page has finished handling that answer (same microtask run).
ANSWERED_SCRIPT = """
window.answered = [];
const readJson = Response.prototype.json;
Response.prototype.json = function () {
  const url = this.url;
  return readJson.call(this).then((body) => { window.answered.push(url); return body; });
};
"""


@dataclass
class Demo:
    """One browser tab on the demo page, with what it logged and every request it made."""

    page: Page
    url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def open(self) -> Demo:
        self.page.goto(self.url)
        self.page.wait_for_selector('main[data-state="idle"]')
        return self

    def count(self, route: str) -> int:
        """POSTs the page sent to /v1/models/{name}/<route>."""
        return sum(1 for r in self.requests if r.method == "POST" and r.url.split("?")[0].endswith(f"/{route}"))

    def wait(self, state: str = "ready", map_query: str | None = None) -> None:
        self.page.wait_for_selector(f'main[data-state="{state}"]')
        if map_query is not None:
            self.page.wait_for_selector(f'#view[data-map*="{map_query}"]')
            self.page.wait_for_selector(f'main[data-state="{state}"]')

    def choose(self, select: str, value: str) -> None:
        """Pick the option with this value (Playwright's `value=` also matches labels, and "2" labels value "1")."""
        values = self.page.locator(f"{select} option").evaluate_all("os => os.map(o => o.value)")
        self.page.select_option(select, index=values.index(value))

    def upload(self, path: Path) -> None:
        self.page.set_input_files("#file", path)
        self.page.wait_for_selector("#predictions li")
        self.wait()

    def predictions(self) -> list[tuple[str, float]]:
        rows = self.page.locator("#predictions li")
        return [
            (str(rows.nth(i).get_attribute("data-label")), float(rows.nth(i).get_attribute("data-probability") or 0))
            for i in range(rows.count())
        ]

    def view(self) -> dict[str, Any]:
        """The attention canvas: size, the share of strongly coloured pixels, and a hash of every pixel."""
        return self.page.evaluate(  # type: ignore[no-any-return]
            """() => {
                const c = document.getElementById("view");
                const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                let coloured = 0, hash = 0;
                for (let i = 0; i < d.length; i += 4) {
                    const r = d[i], g = d[i + 1], b = d[i + 2];
                    if (Math.max(r, g, b) - Math.min(r, g, b) > 30) coloured++;
                    hash = (Math.imul(hash, 31) + r + 7 * g + 13 * b) >>> 0;
                }
                return {width: c.width, height: c.height, coloured: coloured / (d.length / 4), hash};
            }"""
        )

    def draw(self, points: list[tuple[float, float]]) -> None:
        """One stroke through `points` (0..1 of the pad) with the mouse, in small steps like a hand."""
        box = self.page.locator("#pad").bounding_box()
        assert box is not None

        def at(x: float, y: float) -> tuple[float, float]:
            return box["x"] + box["width"] * x, box["y"] + box["height"] * y

        mouse = self.page.mouse
        mouse.move(*at(*points[0]))
        mouse.down()
        for x, y in points[1:]:
            mouse.move(*at(x, y), steps=12)
        mouse.up()

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=path, full_page=True)
        return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing and could not be installed (`make test` runs `apt-get install chromium` "
            "for the browser tests; it needs root and Debian's package mirrors)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _demo(browser: Browser, url: str, viewport: dict[str, int]) -> Iterator[Demo]:
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    demo = Demo(page, url)
    page.on("console", lambda m: demo.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: demo.page_errors.append(str(e)))
    page.on("request", lambda r: demo.requests.append(r))
    yield demo
    context.close()
    assert not demo.page_errors, f"uncaught errors in the page: {demo.page_errors}"


@pytest.fixture
def demo(browser: Browser, server: Server) -> Iterator[Demo]:
    yield from _demo(browser, server.url, DESKTOP)


@pytest.fixture
def phone(browser: Browser, server: Server) -> Iterator[Demo]:
    yield from _demo(browser, server.url, PHONE)


@pytest.fixture(scope="module")
def digit(client: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A held-out canvas (a digit the model never trained on) saved as PNG, and its label.

    Canvas 5 (a 3 beside clutter strokes, which the map should leave cold), or else the first one the server
    gets right with some margin: the test checks the page, not the model.
    """
    held_out = digits.held_out_set()
    for i in [5, *range(50)]:
        canvas, label = held_out.images[i], held_out.labels[i]
        png = encode(canvas_image(canvas))
        body = classify(client, png)
        if top_label(body) == str(label) and body["predictions"][0]["probability"] > 0.8:
            path = tmp_path_factory.mktemp("demo") / f"digit-{label}.png"
            path.write_bytes(png)
            return path, str(label)
    raise AssertionError("no confidently classified canvas among the first 50 held-out digits")


def test_page_and_assets_are_served_with_types_and_a_strict_csp(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "<script" in page.text and not re.search(r"<script(?![^>]*\bsrc=)", page.text), "inline script"
    assert not re.search(r"\sstyle=|<style", page.text), "inline style"
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text), "external asset"
    for path, content_type in [("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")]:
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == f"{content_type}; charset=utf-8"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "http://" not in response.text and "https://" not in response.text, f"{path} loads from elsewhere"
    missing = client.get("/static/../service/app.py")
    assert missing.status_code == 404
    assert client.get("/static/nothing.js").json()["error"]["code"] == "not_found"
    assert "/" not in client.get("/openapi.json").json()["paths"], "the page is not part of the API"


def test_page_loads_without_console_errors(demo: Demo, client: httpx.Client) -> None:
    demo.open()
    models = client.get("/v1/models").json()
    default = next(m for m in models["models"] if m["default"])
    assert demo.page.locator("#model").input_value() == models["default"]
    options = demo.page.locator("#model option")
    assert sorted(options.evaluate_all("os => os.map(o => o.value)")) == sorted(m["name"] for m in models["models"])
    facts = demo.page.inner_text("#facts")
    grid = default["grid"]
    assert f"{grid['width']} × {grid['height']} grid" in facts
    assert default["provider"] in facts and default["precision"] in facts and "passed" in facts
    layers = demo.page.locator("#layer option").evaluate_all("os => os.map(o => o.value)")
    heads = demo.page.locator("#head option").evaluate_all("os => os.map(o => o.value)")
    assert layers == [str(i) for i in range(default["layers"])]
    assert heads == ["", *(str(i) for i in range(default["heads"]))]
    assert demo.page.locator("#placeholder").is_visible()
    demo.screenshot("empty")
    assert demo.console_errors == []
    assert [r.url.removeprefix(demo.url) for r in demo.requests if "/v1/" in r.url] == ["/v1/models"]


def test_upload_shows_predictions_and_the_attention_overlay(
    demo: Demo, digit: tuple[Path, str], client: httpx.Client
) -> None:
    path, label = digit
    demo.open()
    demo.upload(path)
    predictions = demo.predictions()
    assert len(predictions) == 5
    assert predictions[0][0] == label
    expected = classify(client, path.read_bytes(), path="/v1/models/digits-vit/classify", top_k=5)
    for (shown, p), want in zip(predictions, expected["predictions"], strict=True):
        assert shown == want["label"] and p == pytest.approx(want["probability"], abs=1e-6)
    fill = demo.page.locator("#predictions li.top .bar-fill")
    demo.page.wait_for_function("() => document.querySelector('#predictions li.top .bar-fill').style.width !== ''")
    assert float(fill.evaluate("e => parseFloat(e.style.width)")) == pytest.approx(predictions[0][1] * 100, abs=0.01)
    assert demo.page.inner_text("#predictions li.top .bar-value").endswith("%")

    view = demo.view()
    assert view["width"] == view["height"] == 640  # square input, long side 640
    assert view["coloured"] > 0.03, "no heat map over the grey digit canvas"
    assert "rollout" in demo.page.inner_text("#map-caption")
    demo.screenshot("upload")
    if os.environ.get("VITSERVE_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        demo.page.screenshot(path=DOCS_SCREENSHOT, full_page=True)

    # The opacity slider only redraws: the grey canvas comes back at 0, the map at 100, with no request.
    sent = len(demo.requests)
    demo.page.locator("#opacity").fill("0")
    assert demo.view()["coloured"] == 0
    assert demo.page.inner_text("#opacity-value") == "0%"
    demo.page.locator("#opacity").fill("100")
    assert demo.view()["coloured"] > view["coloured"]
    demo.page.check("#grid")
    assert demo.view()["hash"] != view["hash"]
    assert len(demo.requests) == sent
    assert demo.count("classify") == 1 and demo.count("attention") == 1


def test_switching_method_redraws_the_map_without_reclassifying(demo: Demo, digit: tuple[Path, str]) -> None:
    path, _ = digit
    demo.open()
    demo.upload(path)
    seen = {"rollout": demo.view()["hash"]}
    assert demo.page.is_disabled("#layer") and demo.page.is_disabled("#head")

    demo.choose("#method", "cls")
    demo.wait(map_query="method=cls")
    seen["cls"] = demo.view()["hash"]
    assert "class-token" in demo.page.inner_text("#map-caption")

    demo.choose("#method", "layer")
    demo.wait(map_query="method=layer&layer=3&head_fusion=mean")
    seen["layer 4"] = demo.view()["hash"]
    assert demo.page.is_enabled("#layer") and demo.page.is_enabled("#head")

    demo.choose("#layer", "1")
    demo.wait(map_query="method=layer&layer=1&head_fusion")
    seen["layer 2"] = demo.view()["hash"]

    demo.choose("#head", "2")
    demo.wait(map_query="method=layer&layer=1&head=2")
    seen["layer 2 head 3"] = demo.view()["hash"]
    assert demo.page.inner_text("#map-caption") == "layer 2 of 4, head 3 of 4"
    assert demo.page.is_disabled("#fusion"), "head fusion means nothing for one head"
    # `cls` is the last layer's class-token attention with heads fused: the same map as layer 4, fused.
    assert seen.pop("layer 4") == seen["cls"]
    assert len(set(seen.values())) == len(seen), f"a method drew the same picture as another: {seen}"

    # Back to rollout: the map fetched first is reused, not asked for again.
    demo.choose("#method", "rollout")
    demo.wait(map_query="method=rollout")
    assert demo.view()["hash"] == seen["rollout"]
    assert demo.count("classify") == 1, "changing the map must not classify again"
    assert demo.count("attention") == 5
    assert demo.predictions()[0][0] == digit[1]
    demo.screenshot("layer-head")


def test_a_relevance_map_per_class_fetches_only_the_new_map(demo: Demo, digit: tuple[Path, str]) -> None:
    path, label = digit
    demo.open()
    demo.upload(path)
    assert demo.page.is_disabled("#target"), "a class to explain means something for relevance maps only"
    demo.choose("#method", "relevance")
    demo.wait(map_query="method=relevance")
    top = demo.view()["hash"]
    assert demo.page.inner_text("#map-caption").startswith(f"relevance for class {label}, the top prediction")
    assert demo.page.is_enabled("#target") and demo.page.is_disabled("#fusion")
    options = demo.page.locator("#target option").evaluate_all("os => os.map(o => [o.value, o.textContent])")
    assert options[0] == ["", "top prediction"] and len(options) == 1 + len(demo.predictions())
    second_index, second_text = options[2]  # the second prediction
    demo.choose("#target", second_index)
    demo.wait(map_query=f"target={second_index}")
    assert demo.view()["hash"] != top, "another class, another map"
    assert demo.page.inner_text("#map-caption").startswith(f"relevance for class {second_text.split(' (')[0]}:")
    demo.choose("#target", "")  # back to the top prediction: drawn from the cache
    demo.wait(map_query="method=relevance")
    assert demo.view()["hash"] == top
    assert demo.count("classify") == 1 and demo.count("attention") == 3  # rollout, then one map per class
    demo.screenshot("relevance")


def test_a_drawn_seven_is_classified_as_seven(demo: Demo) -> None:
    demo.open()
    demo.draw(SEVEN)
    demo.page.wait_for_selector("#predictions li")
    demo.wait()
    label, probability = demo.predictions()[0]
    assert label == "7", f"drew a 7, the page says {demo.predictions()}"
    assert probability > 0.5
    assert demo.view()["coloured"] > 0.03
    assert demo.count("classify") == 1 and demo.count("attention") == 1
    demo.screenshot("drawn-seven")

    demo.page.click("#clear")
    demo.wait("idle")
    assert demo.page.locator("#predictions li").count() == 0
    assert demo.page.locator("#placeholder").is_visible()
    blank = demo.page.evaluate(
        "() => Array.from(document.getElementById('pad').getContext('2d').getImageData(0, 0, 256, 256).data)"
        ".every((v, i) => i % 4 === 3 || v === 0)"
    )
    assert blank, "Clear left ink on the pad"


def test_a_text_file_shows_the_servers_error_message(demo: Demo, client: httpx.Client, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not an image\n")
    answer = client.post("/v1/models/digits-vit/classify", files={"file": ("notes.txt", text.read_bytes())})
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]

    demo.open()
    demo.page.set_input_files("#file", text)
    demo.wait("error")
    alert = demo.page.locator("#message[role=alert]")
    assert alert.is_visible()
    shown = alert.inner_text()
    assert message in shown and "Not a readable image" in shown and "400" in shown
    assert demo.page.locator("#predictions li").count() == 0
    demo.screenshot("error-not-an-image")

    # The page recovers: dismiss, then a drawing works.
    demo.page.click("#message-close")
    assert not alert.is_visible()
    demo.draw(SEVEN)
    demo.page.wait_for_selector("#predictions li")
    demo.wait()
    assert demo.predictions()[0][0] == "7"


def test_an_image_over_the_body_limit_shows_the_413_message(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory, digit: tuple[Path, str]
) -> None:
    limit = 1024
    server = Server(
        MODELS,
        tmp_path_factory.mktemp("small-body") / "server.log",
        VITSERVE_MAX_BODY_BYTES=str(limit),
        VITSERVE_MODELS='["digits-vit"]',
    ).wait_ready()
    try:
        big = tmp_path_factory.mktemp("big") / "big.png"
        canvas_image(digits.held_out_set().images[0], scale=8).save(big)
        assert big.stat().st_size > limit
        for demo in _demo(browser, server.url, DESKTOP):
            demo.open()
            demo.page.set_input_files("#file", big)
            demo.wait("error")
            shown = demo.page.inner_text("#message")
            assert "Too large" in shown and f"the limit is {limit} bytes" in shown and "413" in shown
            demo.screenshot("error-too-large")
    finally:
        server.stop()


def test_phone_width_has_no_horizontal_scroll(phone: Demo, digit: tuple[Path, str]) -> None:
    phone.open()
    phone.upload(digit[0])
    phone.choose("#method", "layer")
    phone.wait(map_query="method=layer")
    width = PHONE["width"]
    assert phone.page.evaluate("document.documentElement.scrollWidth") <= width
    overflowing = phone.page.evaluate(
        """(width) => Array.from(document.querySelectorAll("body *"))
            .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > width + 0.5)
            .map(e => e.id || e.className || e.tagName)""",
        width,
    )
    assert overflowing == [], f"wider than {width}px: {overflowing}"
    assert phone.page.locator("#view").bounding_box()["width"] <= width  # type: ignore[index]
    phone.screenshot("phone")


def test_keyboard_reaches_every_control_in_order(demo: Demo) -> None:
    demo.open()
    controls = demo.page.evaluate(
        """() => Array.from(document.querySelectorAll("select, input, button")).map(e => ({
            id: e.id, tag: e.tagName,
            label: e.labels && e.labels.length ? e.labels[0].innerText : e.getAttribute("aria-label") || e.innerText
        }))"""
    )
    unlabelled = [c["id"] for c in controls if not (c["label"] or "").strip()]
    assert unlabelled == [], f"controls without a label: {unlabelled}"
    assert demo.page.locator("div[onclick], span[onclick], [role=button]").count() == 0

    demo.choose("#method", "layer")  # enable the layer and head selectors
    order = []
    for _ in range(20):
        demo.page.keyboard.press("Tab")
        focused = demo.page.evaluate("document.activeElement.id || document.activeElement.tagName")
        if focused in order:
            break
        order.append(focused)
    expected = ["model", "pick", "brush", "clear", "method", "target", "layer", "head", "fusion", "opacity", "grid"]
    assert [f for f in order if f in expected] == [e for e in expected if not demo.page.is_disabled(f"#{e}")]

    # A button, reached by keyboard, does its job: Enter on "Choose a file" opens the file picker (the dialog
    # itself is cancelled in the page: Playwright's file-chooser event is unreliable with Debian's Chromium).
    demo.page.evaluate(
        """() => document.getElementById("file").addEventListener(
            "click", (e) => { window.picked = true; e.preventDefault(); }, {once: true})"""
    )
    demo.page.focus("#pick")
    demo.page.keyboard.press("Enter")
    assert demo.page.evaluate("window.picked === true")


def test_the_pad_is_classified_once_per_stroke_after_the_pen_lifts(demo: Demo) -> None:
    settle_ms = int(re.search(r"DRAW_SETTLE_MS = (\d+)", APP_JS.read_text()).group(1))  # type: ignore[union-attr]
    demo.page.clock.install()  # the page's timers run when the test moves its clock, not with the wall clock
    demo.open()
    zero = [(0.5 + 0.24 * math.sin(a), 0.5 - 0.33 * math.cos(a)) for a in (2 * math.pi * i / 24 for i in range(25))]
    box = demo.page.locator("#pad").bounding_box()
    assert box is not None
    demo.page.mouse.move(box["x"] + box["width"] * zero[0][0], box["y"] + box["height"] * zero[0][1])
    demo.page.mouse.down()
    for x, y in zero[1:]:
        demo.page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] * y, steps=4)
    demo.page.clock.run_for(2 * settle_ms)  # every timer the page set so far fires; the pen is still down
    assert demo.count("classify") == 0, "classified before the pen lifted"
    assert demo.page.get_attribute("main", "data-state") == "idle"
    demo.page.mouse.up()
    demo.page.clock.run_for(settle_ms)  # the stroke has settled
    demo.page.wait_for_selector("#predictions li")
    demo.wait()
    assert demo.count("classify") == 1
    assert demo.predictions()[0][0] == "0", f"drew a 0, the page says {demo.predictions()}"


def test_an_overloaded_server_shows_its_503_message_and_when_to_retry(demo: Demo, digit: tuple[Path, str]) -> None:
    """The one error the real server cannot be made to give on demand: its 503 body, replayed to the page."""
    message = "the queue for model digits-vit is full (64 waiting); retry after 1 s"
    demo.page.route(
        "**/v1/models/*/classify*",
        lambda route: route.fulfill(
            status=503,
            json={"error": {"code": "overloaded", "message": message, "detail": None}},
            headers={"Retry-After": "1"},
        ),
    )
    demo.open()
    demo.page.set_input_files("#file", digit[0])
    demo.wait("error")
    shown = demo.page.inner_text("#message")
    assert "The server is busy" in shown and message in shown and "503" in shown and "Try again in 1 s" in shown


def test_choosing_another_model_reclassifies_the_same_image(
    demo: Demo, digit: tuple[Path, str], client: httpx.Client
) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    other = next((name for name, m in models.items() if not m["default"] and m["attention"]), None)
    if other is None:
        pytest.skip("the model repository serves no second model with attention")
    demo.open()
    demo.upload(digit[0])
    demo.choose("#model", other)  # the page re-sends the image it holds: nothing to upload again
    demo.wait()
    posted = [r.url.removeprefix(demo.url).split("?")[0] for r in demo.requests if r.method == "POST"]
    assert sorted(posted[2:]) == [f"/v1/models/{other}/attention", f"/v1/models/{other}/classify"]
    assert f"{other} v{models[other]['version']}" in demo.page.inner_text("#facts")
    assert models[other]["precision"] in demo.page.inner_text("#facts")
    assert demo.predictions()[0][0] == digit[1]
    assert demo.view()["coloured"] > 0.03


@pytest.mark.parametrize("how", ["paste", "drop"])
def test_a_pasted_or_dropped_image_is_classified(demo: Demo, digit: tuple[Path, str], how: str) -> None:
    demo.open()
    demo.page.evaluate(
        """([how, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "digit.png", {type: "image/png"}));
            const event = how === "paste"
                ? new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true})
                : new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true});
            document.getElementById(how === "paste" ? "main" : "dropzone").dispatchEvent(event);
        }""",
        [how, base64.b64encode(digit[0].read_bytes()).decode()],
    )
    demo.page.wait_for_selector("#predictions li")
    demo.wait()
    assert demo.predictions()[0][0] == digit[1]
    assert demo.count("classify") == 1 and demo.count("attention") == 1


def test_the_last_choice_wins_when_controls_change_mid_request(demo: Demo, digit: tuple[Path, str]) -> None:
    demo.page.add_init_script(ANSWERED_SCRIPT)
    demo.open()
    demo.page.set_input_files("#file", digit[0])
    demo.choose("#method", "cls")  # while the image's first (rollout) map is on its way
    demo.wait(map_query="method=cls")
    assert demo.count("classify") == 1

    held: list[Route] = []  # the layer map's request, held until the page has moved on
    demo.page.route(lambda url: "/attention?" in url and "method=layer" in url, lambda route: held.append(route))
    demo.choose("#method", "layer")  # asks for a new map...
    while not held:
        demo.page.evaluate("0")  # lets Playwright deliver the intercepted request
    demo.choose("#method", "rollout")  # ...then goes back to a cached one before the answer comes
    demo.wait(map_query="method=rollout")
    held[0].continue_()  # the layer map arrives now, and must not be drawn
    demo.page.wait_for_function("() => window.answered.some((url) => url.includes('method=layer'))")
    assert demo.page.get_attribute("#view", "data-map") == "format=json&top_k=1&method=rollout&head_fusion=mean"
    assert demo.page.get_attribute("main", "data-state") == "ready"
    assert demo.count("classify") == 1


def test_the_discard_ratio_slider_asks_for_a_rollout_that_drops_weak_attention(
    demo: Demo, digit: tuple[Path, str]
) -> None:
    demo.open()
    assert demo.page.locator("#key-form").is_hidden(), "a keyless server: no key form"
    demo.upload(digit[0])
    plain = demo.view()["hash"]
    assert demo.page.is_enabled("#discard") and demo.page.inner_text("#discard-value") == "0%"

    demo.page.locator("#discard").fill("0.5")  # one request when the slider is let go
    demo.wait(map_query="discard_ratio=0.5")
    assert demo.page.get_attribute("#view", "data-map") == (
        "format=json&top_k=1&method=rollout&head_fusion=mean&discard_ratio=0.5"
    )
    assert demo.page.inner_text("#discard-value") == "50%"
    assert "weakest 50% discarded per layer" in demo.page.inner_text("#map-caption")
    assert demo.view()["hash"] != plain, "discarding half of the attention drew the same map"

    demo.choose("#method", "cls")  # discard_ratio applies to rollout only: off, and not sent
    demo.wait(map_query="method=cls")
    assert demo.page.is_disabled("#discard")
    assert "discard_ratio" not in (demo.page.get_attribute("#view", "data-map") or "")
    assert demo.count("classify") == 1 and demo.count("attention") == 3
    assert not [r for r in demo.requests if "authorization" in r.all_headers()], "a keyless page sent a key"


def test_with_keys_the_page_asks_for_one_and_keeps_it_in_this_tab_only(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory, digit: tuple[Path, str]
) -> None:
    key = "demo-key-0123456789abcdef"
    server = Server(
        MODELS,
        tmp_path_factory.mktemp("keyed-demo") / "server.log",
        VITSERVE_API_KEYS=key,
        VITSERVE_MODELS='["digits-vit"]',
    ).wait_ready()
    console: list[str] = []  # every line the page logs, not only errors
    try:
        for demo in _demo(browser, server.url, DESKTOP):
            demo.page.on("console", lambda m: console.append(m.text))
            page = demo.page

            # The first API call gets the 401: the page shows the server's message and the key form.
            page.goto(demo.url)
            demo.wait("key")
            assert page.locator("#key-form").is_visible() and page.locator("#key-forget").is_hidden()
            shown = page.inner_text("#message")
            assert "API key needed" in shown and "no API key was sent" in shown and "401" in shown
            assert page.evaluate("document.activeElement.id") == "api-key"

            page.fill("#api-key", "wrong-key")
            page.press("#api-key", "Enter")
            demo.wait("key")
            page.wait_for_selector("#message:has-text('not valid')")
            assert page.evaluate("sessionStorage.length") == 0, "a refused key is not kept"

            page.fill("#api-key", key)
            page.click("#key-use")
            demo.wait("idle")
            assert page.locator("#model").input_value() == "digits-vit"
            assert page.input_value("#api-key") == "", "the key does not stay in the page"
            assert page.evaluate("[sessionStorage.getItem('vitserve.apiKey'), localStorage.length]") == [key, 0]
            assert page.context.cookies() == []
            demo.upload(digit[0])
            assert demo.predictions()[0][0] == digit[1] and demo.view()["coloured"] > 0.03

            # The key went in the header of every API call once it was given; never in a URL or a console line.
            sent = [
                (r.url.removeprefix(demo.url).split("?")[0], r.all_headers().get("authorization"))
                for r in demo.requests
                if "/v1/" in r.url
            ]
            assert sorted(sent, key=str) == sorted(
                [
                    ("/v1/models", None),
                    ("/v1/models", "Bearer wrong-key"),
                    ("/v1/models", f"Bearer {key}"),
                    ("/v1/models/digits-vit/classify", f"Bearer {key}"),
                    ("/v1/models/digits-vit/attention", f"Bearer {key}"),
                ],
                key=str,
            )
            assert not [r.url for r in demo.requests if key in r.url]
            assert not [line for line in console if key in line]
            demo.screenshot("keyed")

            # A reload of the tab keeps it; a new tab asks again (sessionStorage is per tab); Forget forgets.
            page.reload()
            demo.wait("idle")
            assert page.locator("#key-forget").is_visible()
            other = page.context.new_page()
            other.goto(demo.url)
            other.wait_for_selector('main[data-state="key"]')
            other.close()
            page.click("#key-forget")
            demo.wait("key")
            assert page.evaluate("sessionStorage.length") == 0
        assert key not in server.log.read_text()
    finally:
        server.stop()
