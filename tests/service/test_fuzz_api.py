"""Schema-driven fuzzing of every operation in the service's OpenAPI document, with schemathesis.

For each operation schemathesis generates requests from the documented parameters and bodies (valid and
invalid ones), sends them to the running server (the session `server` fixture) and checks each response:
never a 5xx, a status code the operation documents, the documented content type, and a body that matches
the documented schema. Image bodies are mostly random bytes, so 400 and 415 are the usual answers: the point
is that they are answers.

The document is built from the application at collection time, because pytest must know the operations
before any fixture runs (schemathesis' fixture-based loader does not work with pytest 9);
`test_the_served_document_is_the_one_fuzzed` proves it is exactly what the server publishes at
`/openapi.json`. Bounded: `MAX_EXAMPLES` per operation, derandomized, so a failure reproduces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (hypothesis comes with schemathesis)
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.conftest import MODELS  # noqa: E402

MAX_EXAMPLES = 150  # per operation and phase: about 2,500 requests in all, ~25 s on 2 shared cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
DOCUMENT = create_app(Settings(model_dir=MODELS)).openapi()
LOADED = {"name": "digits-vit", "version": "1"}
SENT: Counter[str] = Counter()  # operation label -> requests sent; printed at the end (pytest -s)
STATUSES: Counter[int] = Counter()

schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module", autouse=True)
def no_server_faults(server) -> Iterator[None]:
    """After the module: the server never logged a traceback (a 500 would have)."""
    yield
    print(f"\nschemathesis: {SENT.total()} requests over {len(SENT)} operations; statuses {sorted(STATUSES.items())}")
    log = server.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log


def test_the_served_document_is_the_one_fuzzed(client):
    assert client.get("/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # a server call, not a pure function: its time varies with the machine's load
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_every_operation_answers_as_documented(case, server):
    SENT[case.operation.label] += 1
    if case.path_parameters and SENT[case.operation.label] % 2:
        # Random model names only ever reach the 404; every other case names a loaded model, so that the
        # generated queries and bodies get through to the decoding, the batcher and the runtime.
        case.path_parameters = {**case.path_parameters, **LOADED}
    response = case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)
    STATUSES[response.status_code] += 1
