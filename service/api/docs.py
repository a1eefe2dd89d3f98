"""The API's interactive documentation, Swagger UI at `/docs`, served by this server alone.

FastAPI's own page loads Swagger UI from a CDN (blank offline) and starts it with an inline script. This is the
same page built the way FastAPI's guide to self-hosting it describes: the script and style sheet come from the
`fastapi-offline` package (Swagger UI 5, in its `static/` folder, pinned with the other dependencies; the
`swagger-ui-bundle` package holds Swagger UI 4, which cannot read the OpenAPI 3.1 document FastAPI writes), the
page and its start-up script from service/static/docs/, all from this origin under the demo page's
Content-Security-Policy (`service.api.demo`). The files are below `/static/`, always open like the demo
page's own, so on a server with keys `VITSERVE_OPEN_ROUTES=/docs,/openapi.json` publishes the documentation.

ReDoc (FastAPI's `/redoc`) is not served: it styles itself with inline style elements, which that policy refuses,
so under it the page stays blank.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.demo import CONTENT_TYPES, HEADERS, STATIC
from service.errors import NotFound
from service.route_table import endpoint

router = APIRouter(tags=["docs"], include_in_schema=False)

PAGES = STATIC / "docs"
VENDORED = Path(str(files("fastapi_offline") / "static"))
# Every file the page loads, by the name in its URL: no part of a URL ever reaches the filesystem.
ASSETS = {
    "swagger-init.js": PAGES / "swagger-init.js",
    "swagger-ui-bundle.js": VENDORED / "swagger-ui-bundle.js",
    "swagger-ui.css": VENDORED / "swagger-ui.css",
}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers=HEADERS)


@endpoint(router, "docs_page")
async def swagger_ui() -> FileResponse:
    return _file(PAGES / "swagger.html")


@endpoint(router, "docs_file")
async def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"no documentation file {name!r}; the API's documentation is at /docs")
    return _file(path)
