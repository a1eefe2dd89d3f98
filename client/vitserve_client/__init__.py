"""Python client for vitserve: classify images and get attention maps from a Vision Transformer server.

    >>> from vitserve_client import Client
    >>> with Client("http://127.0.0.1:8000") as client:    # doctest: +SKIP
    ...     print(client.classify("digit.png").top.label)
    4

`Client` blocks, `AsyncClient` is its asyncio twin; errors are in `vitserve_client.errors`, response types
in `vitserve_client.models`. The `vitserve-client` command (or `python -m vitserve_client`) is the CLI.
"""

from vitserve_client._core import USE_CLIENT_DEFAULT, UseClientDefault
from vitserve_client._version import __version__
from vitserve_client.client import AsyncClient, Client
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
from vitserve_client.models import (
    AttentionBatchItem,
    AttentionBatchResponse,
    AttentionPNG,
    AttentionResponse,
    BatchItem,
    BatchResponse,
    ClassifyResponse,
    Health,
    ModelInfo,
    ModelList,
    Prediction,
    Timings,
)

__all__ = [
    "USE_CLIENT_DEFAULT",
    "APIError",
    "AsyncClient",
    "AttentionBatchItem",
    "AttentionBatchResponse",
    "AttentionPNG",
    "AttentionResponse",
    "AuthenticationError",
    "BadImageError",
    "BadRequestError",
    "BatchItem",
    "BatchResponse",
    "ClassifyResponse",
    "Client",
    "Health",
    "InvalidParameterError",
    "ModelInfo",
    "ModelList",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "Prediction",
    "ServerError",
    "Timings",
    "TransportError",
    "UnexpectedResponseError",
    "UnsupportedMediaTypeError",
    "UseClientDefault",
    "VitserveError",
    "__version__",
]
