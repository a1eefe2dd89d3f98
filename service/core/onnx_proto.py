"""Just enough of ONNX's protobuf schema to read and rewrite a graph's nodes, without the `onnx` package.

The serving install has protobuf (onnxruntime needs it) but not `onnx` (55 MB with its dependency ml_dtypes, a
sixth of the image). service.core.graph_rewrite only reads and replaces nodes and adds small initializers, so it
needs these messages and fields, declared here with their numbers from onnx/onnx.proto (field numbers never
change in a published protobuf schema). Every other field of a parsed model is kept as an unknown field and
written back as it came, so a graph round-trips whole.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
# (message, [(field, number, type, label, message type)]) in onnx.proto's own names and numbers.
_MESSAGES: list[tuple[str, list[tuple[str, int, int, int, str]]]] = [
    (
        "AttributeProto",
        [
            ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
            ("f", 2, _F.TYPE_FLOAT, _F.LABEL_OPTIONAL, ""),
            ("i", 3, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
            ("ints", 8, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
            ("type", 20, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),  # an enum in onnx.proto: same varint on the wire
        ],
    ),
    (
        "NodeProto",
        [
            ("input", 1, _F.TYPE_STRING, _F.LABEL_REPEATED, ""),
            ("output", 2, _F.TYPE_STRING, _F.LABEL_REPEATED, ""),
            ("name", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
            ("op_type", 4, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
            ("attribute", 5, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "AttributeProto"),
            ("domain", 7, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ],
    ),
    (
        "TensorProto",
        [
            ("dims", 1, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
            ("data_type", 2, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
            ("name", 8, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
            ("raw_data", 9, _F.TYPE_BYTES, _F.LABEL_OPTIONAL, ""),
            ("data_location", 14, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
        ],
    ),
    (
        "GraphProto",
        [
            ("node", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "NodeProto"),
            ("initializer", 5, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "TensorProto"),
        ],
    ),
    (
        "OperatorSetIdProto",
        [("domain", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""), ("version", 2, _F.TYPE_INT64, _F.LABEL_OPTIONAL, "")],
    ),
    (
        "ModelProto",
        [
            ("graph", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "GraphProto"),
            ("opset_import", 8, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "OperatorSetIdProto"),
        ],
    ),
]
PACKAGE = "vitserve_onnx_subset"  # not "onnx": never clashes with the real schema in protobuf's default pool

# onnx.proto's enum values used here
FLOAT, INT64 = 1, 7  # TensorProto.DataType
EXTERNAL = 1  # TensorProto.DataLocation
ATTR_INT, ATTR_INTS = 2, 7  # AttributeProto.AttributeType


@cache
def messages() -> dict[str, Any]:
    """The message classes, by onnx.proto name (built once, in a pool of their own)."""
    file = descriptor_pb2.FileDescriptorProto(name=f"{PACKAGE}.proto", package=PACKAGE, syntax="proto2")
    for name, fields in _MESSAGES:
        message = file.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            message.field.add(
                name=field,
                number=number,
                type=kind,
                label=label,
                type_name=f".{PACKAGE}.{type_name}" if type_name else None,
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}")) for name, _ in _MESSAGES
    }


def load(data: bytes) -> Any:
    """A serialized ONNX model as this module's ModelProto."""
    model = messages()["ModelProto"]()
    model.ParseFromString(data)
    return model


def node(op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **ints: int | list[int]) -> Any:
    """A NodeProto with integer (or integer-list) attributes."""
    classes = messages()
    made = classes["NodeProto"](op_type=op_type, input=inputs, output=outputs, domain=domain)
    for name, value in ints.items():
        if isinstance(value, list):
            made.attribute.append(classes["AttributeProto"](name=name, ints=value, type=ATTR_INTS))
        else:
            made.attribute.append(classes["AttributeProto"](name=name, i=value, type=ATTR_INT))
    return made


def tensor(name: str, data_type: int, dims: list[int], raw: bytes) -> Any:
    """An initializer holding `raw` little-endian values."""
    return messages()["TensorProto"](name=name, data_type=data_type, dims=dims, raw_data=raw)
