"""The demo page: `GET /` and its static files, a browser client of the public API and nothing more.

The page (service/static/) has no build step and no external assets, so its Content-Security-Policy can be
strict: everything comes from this origin, no inline script or style, and the page only talks to the `/v1`
routes. Images drawn client-side become `blob:`/`data:` URLs, which `img-src` allows.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import NotFound
from service.route_table import endpoint

router = APIRouter(tags=["demo"], include_in_schema=False)

STATIC = Path(__file__).resolve().parents[1] / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
# Revalidate on every load: the files are small, and a stale app.js against a newer API is a confusing bug.
HEADERS = {"content-security-policy": CONTENT_SECURITY_POLICY, "cache-control": "no-cache"}


def _static_file(name: str) -> FileResponse:
    # Only regular files that are in the folder, by name: no path from the URL ever reaches the filesystem, and a
    # symlink placed there (to a file elsewhere) is never followed.
    served = {p.name: p for p in STATIC.iterdir() if not p.is_symlink() and p.is_file() and p.suffix in CONTENT_TYPES}
    path = served.get(name)
    if path is None:
        raise NotFound(f"no static file {name!r}; the demo page is at /")
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers=HEADERS)


@endpoint(router, "demo_page")
async def page() -> FileResponse:
    return _static_file("index.html")


@endpoint(router, "demo_file")
async def static_file(name: str) -> FileResponse:
    return _static_file(name)
