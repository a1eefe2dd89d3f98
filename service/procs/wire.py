"""What HTTP workers and the inference engine say to each other, and the shared memory they say it through.

Each worker owns a **slot pool**: an anonymous shared-memory file (memfd) of `count` slots, each holding one
image's model input (3 x H x W float32, for the largest model served) and its logits. The worker writes
preprocessed pixels into free slots and sends the engine a small message naming them; the engine's batcher
stacks the slots into one batch (the one copy of the pixels), runs it, writes each image's logits back into its
slot and answers. Pixels never travel through the socket, and nothing is pickled. Attention tensors (large, and
asked for rarely) and relevance maps come back in the answer itself as raw float32 bytes.

Messages are little-endian structs on a Unix stream socket:

    worker -> engine  HELLO    memfd path, slot count, slot geometry (JSON, length-prefixed), once
    engine -> worker  WELCOME  the catalog (below) and the engine's pid (JSON), once
    worker -> engine  REQUEST  request id, version id, flags, n, n slot numbers; with flag RELEVANCE, then n
                               target classes (int32, -1: the image's top prediction)
    engine -> worker  REPLY    request id, status, n x (queue ms, compute ms, batch size), attention bytes (with
                               RELEVANCE: the n raw relevance maps instead), error JSON (message, detail) when
                               status is not OK
    engine -> worker  CATALOG  a REPLY header with status CATALOG and the catalog number, then the catalog JSON:
                               each served version's id, metadata and directory; unavailable and unloaded models
    worker -> engine  ACK      a REQUEST header with flag CATALOG_ACK and the catalog number: switched to it
    worker -> engine  ADMIN    a REQUEST header with flag ADMIN, then {"op": "load" | "unload", "name"} (JSON);
                               answered by a REPLY with no images (an error JSON with its HTTP status if refused)

A REQUEST names a model *version* by the id the engine gave it in a catalog, so a request a worker admitted
before a reload reaches the version it looked up (service/procs/engine.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# Status of a REPLY: what the engine's batcher said, as the worker must re-raise it.
OK, OVERLOADED, UNAVAILABLE, FAILED = 0, 1, 2, 3
CATALOG = 4  # not an answer: the engine's new catalog follows
# REQUEST flags: run the attention graph; an admin command follows; the catalog numbered request id is in force;
# target classes follow the slots, and relevance maps come back.
ATTENTION, ADMIN, CATALOG_ACK, RELEVANCE = 1, 2, 4, 8

_LENGTH = struct.Struct("<I")
REQUEST = struct.Struct("<IHBH")  # request id, version id, flags, image count; then count x u16 slot numbers
REPLY = struct.Struct("<IBHI")  # request id, status, image count, attention byte count; then timings, bytes, error
TIMING = struct.Struct("<ffH")  # queue ms, compute ms, batch size
SLOT_INDEX = struct.Struct("<H")


def pack_targets(targets: list[int]) -> bytes:
    return struct.pack(f"<{len(targets)}i", *targets)


def unpack_targets(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}i", data))


@dataclass(frozen=True)
class SlotGeometry:
    """How big a slot's two regions are: the largest input and the most classes of the models served."""

    input_floats: int
    output_floats: int

    @property
    def slot_bytes(self) -> int:
        return 4 * (self.input_floats + self.output_floats)


class SlotPool:
    """`count` slots in one shared mapping; the worker creates it (`create`), the engine maps it (`attach`)."""

    def __init__(self, fd: int, count: int, geometry: SlotGeometry) -> None:
        self.fd = fd
        self.count = count
        self.geometry = geometry
        self.memory = mmap.mmap(fd, count * geometry.slot_bytes)
        floats = np.frombuffer(self.memory, np.float32).reshape(count, -1)  # (count, input + output)
        self.inputs = floats[:, : geometry.input_floats]
        self.outputs = floats[:, geometry.input_floats :]

    @classmethod
    def create(cls, count: int, geometry: SlotGeometry) -> SlotPool:
        fd = os.memfd_create("vitserve-slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, count * geometry.slot_bytes)
        return cls(fd, count, geometry)

    @classmethod
    def attach(cls, path: str, count: int, geometry: SlotGeometry) -> SlotPool:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # /proc/<worker pid>/fd/<fd>: the worker's memfd
        return cls(fd, count, geometry)

    def pixels(self, slot: int, shape: tuple[int, int, int]) -> np.ndarray:
        """The slot's input region as a (3, H, W) array (a view: writing it writes the shared memory)."""
        return self.inputs[slot, : shape[0] * shape[1] * shape[2]].reshape(shape)

    def logits(self, slot: int, classes: int) -> np.ndarray:
        return self.outputs[slot, :classes]

    def close(self) -> None:
        """Close the descriptor and unmap the slots, or, while a view of them is still held elsewhere (in the
        engine, a request a departed worker left in a batch queue), leave the mapping to be unmapped with the last
        view (mmap's own deallocation)."""
        del self.inputs, self.outputs
        with contextlib.suppress(BufferError):  # "cannot close exported pointers exist"
            self.memory.close()
        os.close(self.fd)


def pack_json(value: Any) -> bytes:
    data = json.dumps(value).encode()
    return _LENGTH.pack(len(data)) + data


async def read_json(reader: asyncio.StreamReader) -> Any:
    """One length-prefixed JSON value, as `pack_json` wrote it."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return json.loads(await reader.readexactly(length))
