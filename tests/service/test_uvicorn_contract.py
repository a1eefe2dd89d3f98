"""The connection layer (service/http/protocol.py) builds on uvicorn's httptools protocol, and is the one module
that names uvicorn's internals. Each name it relies on is listed there and checked here against the installed
uvicorn, so that an upgrade that renames or drops one fails here, naming it, instead of in production."""

from __future__ import annotations

import asyncio
import inspect
import re
from importlib.metadata import version
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from service.http import protocol as http_protocol
from service.http.fast_path import Exchange
from tests.conftest import ROOT

UVICORN = version("uvicorn")


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)


async def _protocol_mid_request() -> HttpToolsProtocol:
    """uvicorn's own protocol with a request's headers parsed and its cycle made, as the connection layer sees it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = Config(app, http="httptools", log_config=None)
    config.load()
    protocol = HttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(_Transport())
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
    return protocol


def test_every_uvicorn_attribute_the_connection_layer_reads_exists() -> None:
    protocol = asyncio.run(_protocol_mid_request())
    missing = [name for name in http_protocol.UVICORN_ATTRIBUTES if not hasattr(protocol, name)]
    assert not missing, (
        f"uvicorn {UVICORN}'s HttpToolsProtocol no longer has {missing}, which service/http/protocol.py reads; "
        "adapt the connection layer to this uvicorn, or keep uvicorn below it in pyproject.toml"
    )


@pytest.mark.parametrize("name", http_protocol.UVICORN_METHODS)
def test_every_uvicorn_method_the_connection_layer_overrides_or_calls_exists(name: str) -> None:
    assert callable(getattr(HttpToolsProtocol, name, None)), (
        f"uvicorn {UVICORN}'s HttpToolsProtocol.{name} is gone; service/http/protocol.py overrides or calls it"
    )


def test_an_exchange_provides_what_uvicorn_reads_of_a_cycle() -> None:
    """uvicorn's protocol reads these of whatever stands in `cycle`; a direct-path exchange stands there."""
    source = inspect.getsource(HttpToolsProtocol)
    read = set(re.findall(r"self\.cycle\.(\w+)", source))
    # `body` and `more_body` are read only by on_body/on_message_complete, which the connection layer answers
    # itself while an exchange receives.
    unknown = read - set(http_protocol.CYCLE_ATTRIBUTES) - {"body", "more_body"}
    assert not unknown, f"uvicorn {UVICORN} reads {sorted(unknown)} of a cycle; a direct-path Exchange lacks them"
    cycle_fields = set(inspect.signature(RequestResponseCycle.__init__).parameters) | set(
        re.findall(r"self\.(\w+) =", inspect.getsource(RequestResponseCycle))
    )
    assert set(http_protocol.CYCLE_ATTRIBUTES) <= cycle_fields
    exchange_source = inspect.getsource(Exchange)
    for name in http_protocol.CYCLE_ATTRIBUTES:
        assert re.search(rf"\b{name}\b", exchange_source), f"Exchange does not provide `{name}`"


def test_status_lines_are_uvicorns() -> None:
    assert httptools_impl.STATUS_LINE[200] == b"HTTP/1.1 200 OK\r\n"


def test_only_the_connection_layer_names_uvicorn_internals() -> None:
    users = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "service").rglob("*.py")
        if re.search(r"^\s*(from|import) uvicorn\.protocols", path.read_text(), re.MULTILINE)
    )
    assert users == ["service/http/protocol.py"], users


def test_pyproject_bounds_uvicorn_and_httptools_to_the_tested_versions() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    for package in ("uvicorn", "httptools"):
        (spec,) = re.findall(rf'"{package}([^"]*)"', text)
        assert "<" in spec, f"{package} has no upper bound in pyproject.toml: {spec!r}"
        upper = re.search(r"<=?\s*([0-9.]+)", spec)
        assert upper is not None
        installed = tuple(int(p) for p in version(package).split(".")[:2])
        bound = tuple(int(p) for p in upper[1].split(".")[:2])
        assert installed <= bound, f"{package} {version(package)} is installed, above the bound {spec}"
