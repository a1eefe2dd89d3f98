"""The V2 codec's request parsing (service.v2.codec.parse_request), without a server: pydantic-core parses the JSON
header, a header it refuses gets the answer json.loads + model_validate always gave, and a small header's parsed
request is kept and shared, so it must be immutable."""

from __future__ import annotations

import json

import pydantic
import pytest

from service.errors import BadRequest
from service.v2.codec import InferRequest, parse_request

TENSOR = {"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32", "parameters": {"binary_data_size": 8}}


def header(**fields: object) -> bytes:
    return json.dumps({"inputs": [TENSOR], **fields}).encode()


@pytest.mark.parametrize(
    ("body", "request_id"),
    [
        (header(id="utf-16").decode().encode("utf-16"), "utf-16"),  # json.loads detects UTF-16 and UTF-32
        (b"\xef\xbb\xbf" + header(id="bom"), "bom"),  # a UTF-8 byte order mark
        (b'{"id": "\\ud800", "inputs": []}', "\ud800"),  # a lone surrogate escape
    ],
)
def test_headers_pydantic_core_refuses_are_read_as_before(body: bytes, request_id: str) -> None:
    parsed, binary = parse_request(body, None)
    assert parsed.id == request_id and binary == b""


def test_deep_json_data_is_read_as_before() -> None:
    # pydantic-core stops at 200 levels; json.loads reads this, and decode_input flattens it
    data = "[" * 300 + "1" + "]" * 300
    body = f'{{"inputs": [{{"name": "x", "shape": [1], "datatype": "FP32", "data": {data}}}]}}'.encode()
    parsed, _ = parse_request(body, None)
    assert parsed.inputs[0].data == json.loads(data)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"inputs": []} trailing', "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON arrays or objects too deeply"),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [' + b"9" * 5000 + b"]}]}",
            "will not parse",
        ),
        (b'{"inputs": [{"name": 5}]}', "does not follow the V2 protocol: inputs.0.name"),
        (b'{"parameters": null, "inputs": []}', "parameters: Input should be a valid dictionary"),
    ],
)
def test_bad_headers_get_the_messages_they_always_got(body: bytes, message: str) -> None:
    for _ in range(2):  # a header that fails is not kept: the second answer is the first one
        with pytest.raises(BadRequest, match=message):
            parse_request(body, None)


def test_a_kept_header_is_shared_and_cannot_be_changed() -> None:
    body = header(id="kept", parameters={"binary_data_output": True}) + b"\0" * 8
    cut = str(len(body) - 8)
    first, binary = parse_request(body, cut)
    second, _ = parse_request(bytes(bytearray(body)), cut)  # equal bytes, another object
    assert binary == b"\0" * 8 and second is first
    assert first == InferRequest.model_validate(json.loads(body[: int(cut)]))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        first.id = "changed"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        first.inputs[0].name = "changed"  # type: ignore[misc]
