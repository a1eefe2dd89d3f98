"""An HTTP worker's side of the engine link (multi-process mode): the slot pool, and batchers that forward.

`RemoteBatcher` has the interface of `DynamicBatcher` (`submit_many`, `check_room`, `start`, `stop`, `model`,
`policy`), so routes and `ServiceState` work the same in one process or many: the worker writes a request's
pixels into free slots of its pool, sends one REQUEST, and awaits the REPLY; logits are read back from the
slots. If the engine goes away, every waiting request gets 503 and the worker stops being ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service import engine_protocol as wire
from service.batching import BatchPolicy, Result
from service.errors import Overloaded, Unavailable
from service.runtime import LoadedModel, LoadFailure, ModelRepository, discover
from vit_artifact.metadata import read_metadata

if TYPE_CHECKING:
    from service.state import ServiceState

log = logging.getLogger("vitserve.worker")

ENGINE_START_S = 600.0  # how long a worker waits for the engine's socket: a large model can take minutes to load


class EngineLink:
    """One connection to the engine, with this worker's slot pool and the requests awaiting an answer."""

    def __init__(self, pool: wire.SlotPool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.pool = pool
        self.reader = reader
        self.writer = writer
        self.free = list(range(pool.count))
        self.pending: dict[int, tuple[asyncio.Future, list[int], LoadedModel]] = {}
        self.next_id = 0
        self.alive = True
        self.welcome: dict[str, Any] = {}
        self._reader_task: asyncio.Task | None = None

    def index(self, model: str) -> int:
        """The model's number in REQUEST messages: its place in the engine's sorted list."""
        return [m["name"] for m in self.welcome["models"]].index(model)

    def check_slots(self, count: int) -> None:
        """Refuse (503) a request of `count` images when this worker's pool has fewer slots free."""
        if count > len(self.free):
            raise Overloaded(
                f"this worker has {len(self.free)} free input slots and the request has {count} images; retry shortly",
                headers={"Retry-After": "1"},
            )

    @classmethod
    async def connect(cls, path: str, count: int, geometry: wire.SlotGeometry) -> EngineLink:
        pool = wire.SlotPool.create(count, geometry)
        reader, writer = await _connect(path)
        hello = {"pid": os.getpid(), "fd": pool.fd, "count": count, "geometry": vars(geometry)}
        writer.write(wire.pack_json(hello))
        link = cls(pool, reader, writer)
        link.welcome = await wire.read_json(reader)
        link._reader_task = asyncio.get_running_loop().create_task(link._read_replies(), name="engine-replies")
        return link

    async def infer(
        self, model: LoadedModel, index: int, images: Sequence[np.ndarray], with_attention: bool
    ) -> list[Result]:
        if not self.alive:
            raise Unavailable("the inference engine is not running; retry shortly", headers={"Retry-After": "1"})
        self.check_slots(len(images))
        slots = [self.free.pop() for _ in images]
        shape = (3, *model.meta.input_size)
        for slot, pixels in zip(slots, images, strict=True):
            self.pool.pixels(slot, shape)[:] = pixels  # the one copy of the pixels on this side
        self.next_id = (self.next_id + 1) % 2**32
        request_id = self.next_id
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self.pending[request_id] = (future, slots, model)
        flags = wire.ATTENTION if with_attention else 0
        self.writer.write(
            wire.REQUEST.pack(request_id, index, flags, len(slots)) + struct.pack(f"<{len(slots)}H", *slots)
        )
        # Shielded: a request abandoned by its client keeps its slots until the engine has answered (`_answer`
        # frees them), so a slot is never rewritten while the engine may still read it.
        return await asyncio.shield(future)

    async def _read_replies(self) -> None:
        try:
            while True:
                request_id, status, count, attention_bytes = wire.REPLY.unpack(
                    await self.reader.readexactly(wire.REPLY.size)
                )
                timings = (
                    [
                        wire.TIMING.unpack(t)
                        for t in _chunks(await self.reader.readexactly(wire.TIMING.size * count), wire.TIMING.size)
                    ]
                    if status == wire.OK
                    else []
                )
                attention = await self.reader.readexactly(attention_bytes) if attention_bytes else b""
                error = await wire.read_json(self.reader) if status != wire.OK else None
                self._answer(request_id, status, timings, attention, error)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._engine_gone()

    def _answer(self, request_id: int, status: int, timings: list, attention: bytes, error: dict | None) -> None:
        future, slots, model = self.pending.pop(request_id)
        if error is not None:
            self.free.extend(slots)
            if not future.done():
                cls = Overloaded if status == wire.OVERLOADED else Unavailable
                headers = {"Retry-After": "1"} if status in (wire.OVERLOADED, wire.UNAVAILABLE) else None
                future.set_exception(cls(error["message"], detail=error["detail"], headers=headers))
            return
        meta = model.meta
        maps = None
        if attention:
            per_image = (meta.num_layers, meta.num_heads, meta.num_tokens, meta.num_tokens)
            maps = np.frombuffer(attention, np.float32).reshape(len(slots), *per_image)
        classes = len(meta.labels)
        results = [
            Result(
                logits=self.pool.logits(slot, classes).copy(),  # copied out before the slot is free again
                attentions=None if maps is None else maps[i],
                queue_ms=queue_ms,
                compute_ms=compute_ms,
                batch_size=batch_size,
            )
            for i, (slot, (queue_ms, compute_ms, batch_size)) in enumerate(zip(slots, timings, strict=True))
        ]
        self.free.extend(slots)
        if not future.done():
            future.set_result(results)

    def _engine_gone(self) -> None:
        if self.alive:
            log.error("the inference engine closed the connection; answering 503 until the server restarts")
        self.alive = False
        for future, slots, _ in self.pending.values():
            self.free.extend(slots)  # nobody reads them any more
            if not future.done():
                future.set_exception(
                    Unavailable("the inference engine stopped; retry shortly", headers={"Retry-After": "1"})
                )
        self.pending.clear()

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self.writer.close()
        self.pool.close()


async def _connect(path: str, wait_s: float = ENGINE_START_S) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the engine, which may still be loading its models (workers start alongside it)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            return await asyncio.open_unix_connection(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # an abandoned request's error is expected, not "never retrieved"


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class RemoteBatcher:
    """A model's batcher as a worker sees it: admission and batching happen in the engine."""

    def __init__(self, link: EngineLink, index: int, model: LoadedModel, policy: BatchPolicy) -> None:
        self.link = link
        self.index = index
        self.model = model
        self.policy = policy

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def check_room(self, count: int) -> None:
        """The engine's queue is not visible here; only this worker's own slots are."""
        self.link.check_slots(count)

    async def submit_many(self, images: Sequence[np.ndarray], *, with_attention: bool, source: int = 0) -> list[Result]:
        try:
            return await asyncio.wait_for(
                self.link.infer(self.model, self.index, images, with_attention), self.policy.timeout_s + 5
            )
        except TimeoutError:  # the engine's own timeout answers first; this one only guards a stuck engine
            raise Unavailable(
                "the inference engine did not answer in time; retry shortly", headers={"Retry-After": "1"}
            ) from None

    def __repr__(self) -> str:
        return f"RemoteBatcher({self.model.name}, {self.policy})"


def slot_geometry(directories: list[Path]) -> wire.SlotGeometry:
    """Slots big enough for the largest input and the most classes among the models in `directories`."""
    metas = [read_metadata(d, verify_hashes=False) for d in directories]
    return wire.SlotGeometry(
        input_floats=max(3 * m.input_size[0] * m.input_size[1] for m in metas),
        output_floats=max(len(m.labels) for m in metas),
    )


async def attach_engine(state: ServiceState, socket_path: str, slots: int) -> None:
    """Connect this worker to the engine and serve what it serves: its models, as metadata (the sessions stay in
    the engine), each behind a `RemoteBatcher`."""
    settings = state.settings
    directories = discover(settings.model_dir, settings.models)
    link = await EngineLink.connect(socket_path, slots, slot_geometry(directories))
    welcome = link.welcome
    models: dict[str, LoadedModel] = {}
    for entry in welcome["models"]:
        directory = Path(entry["directory"])
        meta = read_metadata(directory, verify_hashes=False)  # the engine has verified the graphs' hashes
        if meta.name != entry["name"]:
            meta = meta.model_copy(update={"name": entry["name"]})
        models[entry["name"]] = LoadedModel(
            meta=meta,
            directory=directory,
            classify=None,
            attention=None,
            provider=entry["provider"],
            load_seconds=entry["load_seconds"],
            warmed_up=True,
        )
    unavailable = {name: LoadFailure(error, "") for name, error in welcome["unavailable"].items()}
    state.engine = link
    state.repository = ModelRepository(models, welcome["default"], unavailable)
