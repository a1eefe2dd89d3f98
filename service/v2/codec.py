"""Tensors of the Open Inference Protocol (V2, as Triton and KServe define it), in JSON and binary form.

JSON: `{"name", "shape", "datatype", "data": [...]}` with `data` flattened in row-major order (nested lists are
accepted too). Binary tensor data extension: the body is a JSON header of `Inference-Header-Content-Length`
bytes followed by raw tensor bytes, in input order, for each input whose `parameters.binary_data_size` is set;
BYTES elements are each a 4-byte little-endian length and the bytes. In JSON, BYTES elements that carry images
are base64 strings.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import BadRequest

HEADER_LENGTH = "inference-header-content-length"
# ASCII digits only: str.isdigit() also accepts "²", which int() refuses; 19 digits keep it within int64.
_HEADER_LENGTH_VALUE = re.compile(r"[0-9]{1,19}")
NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class TensorIn(BaseModel):
    model_config = ConfigDict(frozen=True)  # parsed once, shared: see _parsed_header

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class OutputRequest(BaseModel):
    model_config = ConfigDict(frozen=True)  # parsed once, shared: see _parsed_header

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(frozen=True)  # parsed once, shared: see _parsed_header

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorIn]
    outputs: list[OutputRequest] | None = None


# Clients of the binary extension send the very same JSON header for every request of one shape (tritonclient,
# KServe's clients, h2load): its parse and validation were the largest piece of Python left per request on the
# event loop, so a small header's parsed request is kept and shared (the models above are frozen; nothing
# changes a parsed request). A header that fails is not kept: it is judged again, the slow way, each time.
_KEPT_HEADER_BYTES = 2048


@functools.lru_cache(maxsize=128)
def _parsed_header(header: bytes) -> InferRequest:
    return InferRequest.model_validate_json(header)


def header_length_value(header_length: str | None) -> int | None:
    """The Inference-Header-Content-Length as a number, or None when absent or not 1-19 ASCII digits."""
    return int(header_length) if header_length is not None and _HEADER_LENGTH_VALUE.fullmatch(header_length) else None


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """Split the body into the JSON header and the binary part, and validate the header."""
    if header_length is not None:
        if not _HEADER_LENGTH_VALUE.fullmatch(header_length) or int(header_length) > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length!r} is not within the body's {len(body)} bytes"
            )
        cut = int(header_length)
        header, binary = body[:cut], body[cut:]
    else:
        header, binary = body, b""
    try:  # pydantic-core parses the JSON itself: half of json.loads + model_validate's time
        if len(header) <= _KEPT_HEADER_BYTES:
            return _parsed_header(header), binary
        return InferRequest.model_validate_json(header), binary
    except ValidationError:
        pass  # a header it refuses, json.loads may still take (UTF-16, a BOM, lone surrogates, deep nesting)
    try:  # the way every refused header is judged, so its answer (success or error) is as it always was
        return InferRequest.model_validate(json.loads(header)), binary
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the inference request is not valid JSON: {e}") from e
    except RecursionError:  # json's parser gives up on arrays nested about a thousand deep
        raise BadRequest("the inference request nests JSON arrays or objects too deeply") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise BadRequest(f"the inference request does not follow the V2 protocol: {problems}") from e
    except ValueError as e:  # after ValidationError, its subclass: integer literals over 4300 digits (a DoS guard)
        raise BadRequest(f"the inference request holds a number Python will not parse: {e}") from e


def element_count(shape: list[int]) -> int:
    if any(d < 0 for d in shape):
        raise BadRequest(f"shape {shape} has a negative dimension")
    # Python integers: numpy's int64 product would overflow (or wrap to 0) on a hostile shape.
    return math.prod(shape)


def decode_bytes_elements(raw: bytes, expected: int, name: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(f"input {name!r}: a BYTES element claims {length} bytes; only {len(raw) - offset} remain")
        items.append(raw[offset : offset + length])
        offset += length
        if len(items) > expected:  # stop here: a lying shape must not buy a loop over millions of elements
            break
    if len(items) != expected:
        held = f"{len(items)}" if offset >= len(raw) else f"more than {expected}"
        raise BadRequest(f"input {name!r}: shape asks for {expected} BYTES elements, the data holds {held}")
    return items


def encode_bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def decode_input(tensor: TensorIn, binary: bytes, offset: int) -> tuple[np.ndarray | list[bytes], int]:
    """The tensor's values (an array, or a list of byte strings for BYTES) and the new binary offset."""
    count = element_count(tensor.shape)
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadRequest(
                f"input {tensor.name!r}: binary_data_size {size} is beyond the {len(binary) - offset} "
                "binary bytes that remain"
            )
        raw = binary[offset : offset + size]
        offset += size
        if tensor.datatype == "BYTES":
            return decode_bytes_elements(raw, count, tensor.name), offset
        dtype = _numpy_type(tensor)
        if len(raw) != count * np.dtype(dtype).itemsize:
            raise BadRequest(
                f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} needs "
                f"{count * np.dtype(dtype).itemsize} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape), offset
    if tensor.data is None:
        raise BadRequest(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
    if tensor.datatype == "BYTES":
        flat = _flatten(tensor.data)
        if len(flat) != count:
            raise BadRequest(f"input {tensor.name!r}: shape asks for {count} elements, data holds {len(flat)}")
        return [_b64(v, tensor.name) for v in flat], offset
    try:
        values = np.asarray(tensor.data, dtype=_numpy_type(tensor))
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an integer beyond the datatype
        raise BadRequest(f"input {tensor.name!r}: data is not {tensor.datatype}: {e}") from e
    if values.size != count:
        raise BadRequest(f"input {tensor.name!r}: shape {tensor.shape} needs {count} values, data holds {values.size}")
    return values.reshape(tensor.shape), offset


def _numpy_type(tensor: TensorIn) -> Any:
    dtype = NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        raise BadRequest(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    return dtype


def _flatten(value: Any) -> list[Any]:
    """Nested lists -> their leaves in row-major order; iterative, so no nesting depth exhausts the stack."""
    leaves: list[Any] = []
    stack: list[Iterator[Any]] = [iter([value])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            leaves.append(item)
        else:
            stack.pop()
    return leaves


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"input {name!r}: BYTES elements in JSON must be base64 strings")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(
            f"input {name!r}: a BYTES element is not valid base64 ({e}); send images base64-encoded in "
            "JSON, or raw with the binary data extension"
        ) from e


_DATATYPES = {np.dtype(t): name for name, t in NUMPY_TYPES.items()}


def datatype_of(value: np.ndarray | list[bytes]) -> str:
    """The protocol's name for an output's element type (FP32, INT64, ...; BYTES for a list of byte strings)."""
    if isinstance(value, list):
        return "BYTES"
    return _DATATYPES[value.dtype]


def encode_output(name: str, value: np.ndarray | list[bytes], shape: list[int], binary: bool) -> tuple[dict, bytes]:
    """One output tensor: its JSON entry, and its binary bytes when sent with the binary extension."""
    entry: dict[str, Any] = {"name": name, "datatype": datatype_of(value), "shape": shape}
    if binary:  # bytes only: the list of Python numbers once built here too took 0.3 s for ViT-B/16 attentions
        raw = encode_bytes_elements(value) if isinstance(value, list) else np.ascontiguousarray(value).tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    entry["data"] = [v.decode() for v in value] if isinstance(value, list) else value.reshape(-1).tolist()
    return entry, b""


@dataclass
class OutputTensor:
    """One computed output: what was asked for, its values (BYTES as a list of byte strings) and its shape."""

    request: OutputRequest
    value: np.ndarray | list[bytes]
    shape: list[int]
    # An output written elsewhere (a shared memory region, service.v2.shared_memory): its entry carries these
    # parameters and no data.
    placed: dict[str, Any] | None = None


def encode_response(header: dict[str, Any], outputs: list[OutputTensor], binary_all: bool) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when any output travels in binary (None: all JSON).

    `header` carries the response's other fields (model name and version, id); `binary_all` is the request's
    `binary_data_output`, which an output's own `binary_data` parameter overrides.
    """
    entries, chunks, any_binary = [], [], False
    for out in outputs:
        if out.placed is not None:
            entries.append(
                {
                    "name": out.request.name,
                    "datatype": datatype_of(out.value),
                    "shape": out.shape,
                    "parameters": out.placed,
                }
            )
            continue
        binary = bool(out.request.parameters.get("binary_data", binary_all))
        entry, raw = encode_output(out.request.name, out.value, out.shape, binary)
        any_binary = any_binary or binary
        entries.append(entry)
        chunks.append(raw)
    payload = json.dumps({**header, "outputs": entries}).encode()
    if not any_binary:
        return payload, None
    return payload + b"".join(chunks), len(payload)
