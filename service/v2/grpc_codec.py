"""gRPC messages <-> the REST codec's forms (service.v2.codec), so both transports share one inference core.

Every input becomes a tensor of the binary tensor data extension: `raw_input_contents[i]` as it is, typed
`contents` packed into the same bytes (BYTES elements each with their 4-byte little-endian length, as in raw
form). The REST decoder then checks shapes, sizes and element counts for both transports alike. A response
mirrors its request: raw outputs (`raw_output_contents`) for raw inputs, as Triton's client expects; typed
`contents` for typed inputs, as KServe's servers answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from service.errors import BadRequest
from service.v2 import codec

# The typed field of `InferTensorContents` for each datatype; FP16 and BF16 have none (raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """A map of `InferParameter` -> plain values (bool, int, str or float), as the JSON form carries them."""
    values = {}
    for name, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            values[name] = getattr(param, choice)
    return values


def input_size(request: Any) -> int:
    """Bytes of tensor data in a `ModelInferRequest`, about: decides whether parsing runs off the event loop."""
    size = sum(len(r) for r in request.raw_input_contents)
    for tensor in request.inputs:
        values = getattr(tensor.contents, CONTENTS_FIELD.get(tensor.datatype, "fp32_contents"))
        size += sum(len(v) for v in values) if tensor.datatype == "BYTES" else 4 * len(values)
    return size


def parse_request(request: Any) -> tuple[codec.InferRequest, bytes]:
    """A `ModelInferRequest` as the REST codec's request, every input's data in the binary part."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs; send one per input, "
            "in the inputs' order"
        )
    tensors, chunks = [], []
    for i, tensor in enumerate(request.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input {tensor.name!r}: send its data in contents or in raw_input_contents, not both")
            data = raw[i]
        else:
            data = _typed_bytes(tensor)
        chunks.append(data)
        params = {**parameters(tensor.parameters), "binary_data_size": len(data)}
        tensors.append(
            codec.TensorIn(name=tensor.name, shape=list(tensor.shape), datatype=tensor.datatype, parameters=params)
        )
    outputs = [codec.OutputRequest(name=o.name, parameters=parameters(o.parameters)) for o in request.outputs]
    parsed = codec.InferRequest(
        id=request.id or None, parameters=parameters(request.parameters), inputs=tensors, outputs=outputs or None
    )
    return parsed, b"".join(chunks)


def _typed_bytes(tensor: Any) -> bytes:
    """A tensor's typed `contents` in raw form."""
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        hint = "send it in raw_input_contents" if tensor.datatype in codec.NUMPY_TYPES else "unknown datatype"
        raise BadRequest(f"input {tensor.name!r}: {tensor.datatype} has no typed contents; {hint}")
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        return codec.encode_bytes_elements(list(values))
    try:
        return np.asarray(values, dtype=codec.NUMPY_TYPES[tensor.datatype]).tobytes()
    except (OverflowError, ValueError) as e:  # an int_contents value beyond INT8, say
        raise BadRequest(f"input {tensor.name!r}: contents are not {tensor.datatype}: {e}") from e


def build_response(
    pb2: Any, name: str, version: str, request_id: str | None, tensors: list[codec.OutputTensor], raw: bool
) -> Any:
    """The `ModelInferResponse` of computed outputs: raw (`raw_output_contents`) or typed `contents`."""
    response = pb2.ModelInferResponse(model_name=name, model_version=version, id=request_id or "")
    for tensor in tensors:
        value = tensor.value
        datatype = "BYTES" if isinstance(value, list) else codec.datatype_of(value)
        entry = response.outputs.add(name=tensor.request.name, datatype=datatype, shape=tensor.shape)
        if isinstance(value, list):
            if raw:
                response.raw_output_contents.append(codec.encode_bytes_elements(value))
            else:
                entry.contents.bytes_contents.extend(value)
        elif raw:
            response.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
        else:
            getattr(entry.contents, CONTENTS_FIELD[datatype]).extend(value.reshape(-1).tolist())
    return response
