"""`Client` (blocking) and `AsyncClient` (asyncio): the same methods, the same arguments, the same results.

    >>> from vitserve_client import Client
    >>> with Client("http://127.0.0.1:8000") as client:            # doctest: +SKIP
    ...     result = client.classify("digit.png", top_k=3)
    ...     print(result.top.label, result.top.probability)
    4 0.91

    >>> import asyncio
    >>> from vitserve_client import AsyncClient
    >>> async def main() -> None:
    ...     async with AsyncClient() as client:                     # $VITSERVE_URL or http://127.0.0.1:8000
    ...         results = await asyncio.gather(*(client.classify(p) for p in ["a.png", "b.png"]))
    ...         print([r.top.label for r in results])
    >>> asyncio.run(main())                                         # doctest: +SKIP
    ['4', '7']

Each client keeps one httpx connection pool: create it once, use it for many calls, close it (or use `with`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx

from vitserve_client._core import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    USE_CLIENT_DEFAULT,
    BaseClient,
    Call,
    Timeout,
    TimeoutTypes,
)
from vitserve_client._images import ImageInput
from vitserve_client.models import (
    AttentionBatchResponse,
    AttentionMethod,
    AttentionPNG,
    AttentionResponse,
    BatchResponse,
    ClassifyResponse,
    HeadFusion,
    Health,
    ModelInfo,
    ModelList,
)

T = TypeVar("T")
_Self = TypeVar("_Self", bound="Client")
_ASelf = TypeVar("_ASelf", bound="AsyncClient")


class Client(BaseClient):
    """Blocking client of a vitserve server.

    Raises `vitserve_client.errors.APIError` subclasses for error answers and `TransportError` when the
    server cannot be reached; see `BaseClient` for the connection, timeout and retry settings. `transport`
    replaces httpx's network transport (e.g. `httpx.MockTransport` in tests).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            headers=headers,
        )
        self._http = httpx.Client(**self._http_options(), transport=transport)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T], timeout: Timeout) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, files=call.files, timeout=self._timeout(timeout)
                )
            except httpx.TransportError as e:
                delay = self._transport_delay(attempt, e)
                if delay is None:
                    raise self._transport_error(e, attempt + 1) from e
            else:
                delay = self._retry_delay(call, attempt, response)
                if delay is None:
                    return self._result(call, response)
            time.sleep(delay)
            attempt += 1

    def health(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Health:
        """`GET /healthz`: the server process is alive."""
        return self._send(self._health(), timeout)

    def ready(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Health:
        """`GET /readyz`: `.ok` when every model is loaded and warmed up (a 503 is returned, not raised)."""
        return self._send(self._ready(), timeout)

    def models(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelList:
        """The models the server has loaded, and which one is the default."""
        return self._send(self._models(), timeout)

    def model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """One model's facts: labels, input size, grid, layers, heads, preprocessing, parity report."""
        return self._send(self._model(name), timeout)

    def classify(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        top_k: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ClassifyResponse:
        """Top-`top_k` predictions for one image (path, bytes, binary file, PIL image or uint8 array)."""
        return self._send(self._classify(image, model, top_k), timeout)

    def classify_batch(
        self,
        images: Iterable[ImageInput],
        *,
        model: str | None = None,
        top_k: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> BatchResponse:
        """Several images in one request; one result per image, in order, with `.error` set where one failed."""
        return self._send(self._classify_batch(images, model, top_k), timeout)

    def attention_batch(
        self,
        images: Iterable[ImageInput],
        *,
        model: str | None = None,
        method: AttentionMethod = "rollout",
        layer: int | None = None,
        head: int | None = None,
        head_fusion: HeadFusion | None = None,
        discard_ratio: float | None = None,
        target: int | str | None = None,
        top_k: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> AttentionBatchResponse:
        """Attention maps of several images in one request, as JSON grids; one result per image, in order, with
        `.error` set where one failed. The parameters are `attention`'s (a bad layer or head fails the request)."""
        call = self._attention_batch(
            images,
            model,
            method=method,
            layer=layer,
            head=head,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            top_k=top_k,
            target=target,
        )
        return self._send(call, timeout)

    @overload
    def attention(
        self,
        image: ImageInput,
        *,
        model: str | None = ...,
        method: AttentionMethod = ...,
        layer: int | None = ...,
        head: int | None = ...,
        head_fusion: HeadFusion | None = ...,
        discard_ratio: float | None = ...,
        target: int | str | None = ...,
        format: Literal["json"] = ...,
        alpha: float | None = ...,
        top_k: int | None = ...,
        timeout: Timeout = ...,
    ) -> AttentionResponse: ...

    @overload
    def attention(
        self,
        image: ImageInput,
        *,
        model: str | None = ...,
        method: AttentionMethod = ...,
        layer: int | None = ...,
        head: int | None = ...,
        head_fusion: HeadFusion | None = ...,
        discard_ratio: float | None = ...,
        target: int | str | None = ...,
        format: Literal["png"],
        alpha: float | None = ...,
        top_k: int | None = ...,
        timeout: Timeout = ...,
    ) -> AttentionPNG: ...

    def attention(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        method: AttentionMethod = "rollout",
        layer: int | None = None,
        head: int | None = None,
        head_fusion: HeadFusion | None = None,
        discard_ratio: float | None = None,
        target: int | str | None = None,
        format: Literal["json", "png"] = "json",
        alpha: float | None = None,
        top_k: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> AttentionResponse | AttentionPNG:
        """Attention map of one image: a grid (`format="json"`, `.to_numpy()`) or a PNG overlay (`.save(path)`).

        Parameters left as None are not sent, so the server's defaults apply (see the README's table).
        `method="relevance"` draws the class-specific relevance map of `target` (a class index or label;
        default: the top prediction); `.target` says which class it explains.
        """
        call: Call[Any] = self._attention(
            image,
            model,
            method=method,
            layer=layer,
            head=head,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            target=target,
            format=format,
            alpha=alpha,
            top_k=top_k,
        )
        result: AttentionResponse | AttentionPNG = self._send(call, timeout)
        return result


class AsyncClient(BaseClient):
    """Asyncio client of a vitserve server: `Client`'s methods as coroutines.

    Concurrent calls share one connection pool; bound them yourself (e.g. an `asyncio.Semaphore`) when
    sending many images, as the CLI does.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            headers=headers,
        )
        self._http = httpx.AsyncClient(**self._http_options(), transport=transport)

    async def __aenter__(self: _ASelf) -> _ASelf:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T], timeout: Timeout) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, params=call.params, files=call.files, timeout=self._timeout(timeout)
                )
            except httpx.TransportError as e:
                delay = self._transport_delay(attempt, e)
                if delay is None:
                    raise self._transport_error(e, attempt + 1) from e
            else:
                delay = self._retry_delay(call, attempt, response)
                if delay is None:
                    return self._result(call, response)
            await asyncio.sleep(delay)
            attempt += 1

    async def health(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Health:
        """`GET /healthz`: the server process is alive."""
        return await self._send(self._health(), timeout)

    async def ready(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Health:
        """`GET /readyz`: `.ok` when every model is loaded and warmed up (a 503 is returned, not raised)."""
        return await self._send(self._ready(), timeout)

    async def models(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelList:
        """The models the server has loaded, and which one is the default."""
        return await self._send(self._models(), timeout)

    async def model(self, name: str, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> ModelInfo:
        """One model's facts: labels, input size, grid, layers, heads, preprocessing, parity report."""
        return await self._send(self._model(name), timeout)

    async def classify(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        top_k: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ClassifyResponse:
        """Top-`top_k` predictions for one image (path, bytes, binary file, PIL image or uint8 array)."""
        return await self._send(self._classify(image, model, top_k), timeout)

    async def classify_batch(
        self,
        images: Iterable[ImageInput],
        *,
        model: str | None = None,
        top_k: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> BatchResponse:
        """Several images in one request; one result per image, in order, with `.error` set where one failed."""
        return await self._send(self._classify_batch(images, model, top_k), timeout)

    async def attention_batch(
        self,
        images: Iterable[ImageInput],
        *,
        model: str | None = None,
        method: AttentionMethod = "rollout",
        layer: int | None = None,
        head: int | None = None,
        head_fusion: HeadFusion | None = None,
        discard_ratio: float | None = None,
        target: int | str | None = None,
        top_k: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> AttentionBatchResponse:
        """Attention maps of several images in one request, as JSON grids; one result per image, in order, with
        `.error` set where one failed. The parameters are `attention`'s (a bad layer or head fails the request)."""
        call = self._attention_batch(
            images,
            model,
            method=method,
            layer=layer,
            head=head,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            top_k=top_k,
            target=target,
        )
        return await self._send(call, timeout)

    @overload
    async def attention(
        self,
        image: ImageInput,
        *,
        model: str | None = ...,
        method: AttentionMethod = ...,
        layer: int | None = ...,
        head: int | None = ...,
        head_fusion: HeadFusion | None = ...,
        discard_ratio: float | None = ...,
        target: int | str | None = ...,
        format: Literal["json"] = ...,
        alpha: float | None = ...,
        top_k: int | None = ...,
        timeout: Timeout = ...,
    ) -> AttentionResponse: ...

    @overload
    async def attention(
        self,
        image: ImageInput,
        *,
        model: str | None = ...,
        method: AttentionMethod = ...,
        layer: int | None = ...,
        head: int | None = ...,
        head_fusion: HeadFusion | None = ...,
        discard_ratio: float | None = ...,
        target: int | str | None = ...,
        format: Literal["png"],
        alpha: float | None = ...,
        top_k: int | None = ...,
        timeout: Timeout = ...,
    ) -> AttentionPNG: ...

    async def attention(
        self,
        image: ImageInput,
        *,
        model: str | None = None,
        method: AttentionMethod = "rollout",
        layer: int | None = None,
        head: int | None = None,
        head_fusion: HeadFusion | None = None,
        discard_ratio: float | None = None,
        target: int | str | None = None,
        format: Literal["json", "png"] = "json",
        alpha: float | None = None,
        top_k: int | None = None,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> AttentionResponse | AttentionPNG:
        """Attention map of one image: a grid (`format="json"`, `.to_numpy()`) or a PNG overlay (`.save(path)`).

        Parameters left as None are not sent, so the server's defaults apply (see the README's table).
        `method="relevance"` draws the class-specific relevance map of `target` (a class index or label;
        default: the top prediction); `.target` says which class it explains.
        """
        call: Call[Any] = self._attention(
            image,
            model,
            method=method,
            layer=layer,
            head=head,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
            target=target,
            format=format,
            alpha=alpha,
            top_k=top_k,
        )
        result: AttentionResponse | AttentionPNG = await self._send(call, timeout)
        return result
