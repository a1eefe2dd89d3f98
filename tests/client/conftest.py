"""Fixtures for the client tests: real digit canvases, both SDK clients against the live `server`, and the
scripted server (tests/client/scripted.py)."""

from __future__ import annotations

import asyncio
import inspect
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from vitserve_client import AsyncClient, Client

from tests.client.scripted import Reply, Scripted

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"


@dataclass(frozen=True)
class Digit:
    """A held-out canvas: a digit the model never saw, at a random place and scale, with clutter."""

    image: np.ndarray  # (32, 32) uint8
    label: str

    @property
    def png(self) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.image).save(buffer, format="PNG")
        return buffer.getvalue()


@pytest.fixture(scope="session")
def digits() -> list[Digit]:
    from model_export.digits import held_out_set

    canvases = held_out_set()
    return [Digit(canvases.images[i], str(canvases.labels[i])) for i in range(40)]


@pytest.fixture(scope="session")
def digit_dir(tmp_path_factory: pytest.TempPathFactory, digits: list[Digit]) -> Path:
    """Twelve held-out canvases as PNG files named `<i>_<label>.png`."""
    folder = tmp_path_factory.mktemp("digits")
    for i, digit in enumerate(digits[:12]):
        (folder / f"{i:02d}_{digit.label}.png").write_bytes(digit.png)
    return folder


class Blocking:
    """Drives an `AsyncClient` from synchronous test code, so every test runs against both clients.

    One event loop for the client's lifetime: its connection pool belongs to the loop it was first used on.
    """

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kwargs: self.loop.run_until_complete(attr(*args, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture(params=["sync", "async"])
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """`connect(base_url, **options)`: a `Client`, or an `AsyncClient` behind `Blocking`; closed afterwards."""
    closers: list[Callable[[], None]] = []

    def make(base_url: str | None = None, **options: Any) -> Any:
        if request.param == "sync":
            client = Client(base_url, **options)
            closers.append(client.close)
            return client
        blocking = Blocking(AsyncClient(base_url, **options))
        closers.append(blocking.close)
        return blocking

    yield make
    for close in closers:
        close()


@pytest.fixture
def api(connect: Callable[..., Any], server: Any) -> Any:
    """The SDK (sync or async) on the live server, with fast retries so failures stay quick."""
    return connect(server.url, backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[Scripted]:
    srv = Scripted()
    yield srv
    srv.close()


@pytest.fixture
def scripted(scripted_server: Scripted) -> Scripted:
    scripted_server.script(Reply())
    return scripted_server
