"""An HTTP worker's side of the engine link (multi-process mode): the slot pool, and batchers that forward.

`RemoteBatcher` has the interface of `DynamicBatcher` (`submit_many`, `check_room`, `start`, `stop`, `model`,
`policy`), so routes and `ServiceState` work the same in one process or many: the worker writes a request's
pixels into free slots of its pool, sends one REQUEST, and awaits the REPLY; logits are read back from the
slots. If the engine goes away, every waiting request gets 503 and the worker stops being ready.

What the worker serves is what the engine's catalog says (`apply_catalog`): at the welcome, and again after
every reload, load or unload in the engine, each applied with `ServiceState.swap`/`unload` on the event loop
and acknowledged, so the engine knows every worker has switched. The repository extension's load and unload
are asked of the engine (`EngineLink.load_model`, `unload_model`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core.batching import BatchPolicy, Result, Targets
from service.core.runtime import LoadedModel, LoadFailure, discover
from service.errors import RETRY_AFTER_S, Overloaded, ServiceError, Unavailable
from service.procs import wire
from vit_artifact.metadata import ArtifactMetadata, read_metadata

if TYPE_CHECKING:
    from service.core.state import ServiceState

log = logging.getLogger("vitserve.worker")

ENGINE_START_S = 600.0  # how long a worker waits for the engine's socket: a large model can take minutes to load
VERSION_ID = "engine_version"  # where a worker's LoadedModel keeps the id REQUEST messages name it by


def version_id(model: LoadedModel) -> int:
    return int(model.extra[VERSION_ID])


class EngineLink:
    """One connection to the engine, with this worker's slot pool and the requests awaiting an answer."""

    def __init__(self, pool: wire.SlotPool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.pool = pool
        self.reader = reader
        self.writer = writer
        self.free = list(range(pool.count))
        self.pending: dict[int, tuple[asyncio.Future, list[int], LoadedModel, bool]] = {}  # bool: relevance
        self.next_id = 0
        self.alive = True
        self.closing = False  # this worker is shutting down: the engine's end of the link closing is expected
        self.welcome: dict[str, Any] = {}
        self.on_catalog: Callable[[dict[str, Any]], None] | None = None  # `apply_catalog`, once attached
        self.admin_pending: dict[int, asyncio.Future[None]] = {}
        self._ping: asyncio.Future[None] | None = None
        self._reader_task: asyncio.Task | None = None

    def _request_id(self) -> int:
        self.next_id = (self.next_id + 1) % 2**32
        return self.next_id

    async def load_model(self, name: str) -> None:
        """The repository extension's load, carried out by the engine; returns once every worker serves it."""
        await self._admin({"op": "load", "name": name})

    async def unload_model(self, name: str) -> None:
        await self._admin({"op": "unload", "name": name})

    async def ping(self, timeout_s: float) -> bool:
        """Whether the engine answers within `timeout_s` (its event loop runs): readiness asks. One ping at a time
        is outstanding, however many probes ask: a stopped engine collects no backlog."""
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._admin({"op": "ping"}))
        try:
            await asyncio.wait_for(asyncio.shield(self._ping), timeout_s)
        except (TimeoutError, ServiceError):
            return False
        return True

    async def _admin(self, command: dict[str, Any]) -> None:
        if not self.alive:
            raise Unavailable("the inference engine is not running; retry shortly")
        request_id = self._request_id()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.admin_pending[request_id] = future
        self.writer.write(wire.REQUEST.pack(request_id, 0, wire.ADMIN, 0) + wire.pack_json(command))
        await future

    def check_slots(self, count: int) -> None:
        """Refuse (503) a request of `count` images when this worker's pool has fewer slots free."""
        if count > len(self.free):
            raise Overloaded(
                f"this worker has {len(self.free)} free input slots and the request has {count} images; retry shortly",
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
        self,
        model: LoadedModel,
        index: int,
        images: Sequence[np.ndarray],
        with_attention: bool,
        targets: Sequence[int] | None = None,
    ) -> list[Result]:
        if not self.alive:
            raise Unavailable("the inference engine is not running; retry shortly")
        self.check_slots(len(images))
        slots = [self.free.pop() for _ in images]
        shape = (3, *model.meta.input_size)
        for slot, pixels in zip(slots, images, strict=True):
            self.pool.pixels(slot, shape)[:] = pixels  # the one copy of the pixels on this side
        request_id = self._request_id()
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self.pending[request_id] = (future, slots, model, targets is not None)
        flags = (wire.ATTENTION if with_attention else 0) | (0 if targets is None else wire.RELEVANCE)
        self.writer.write(
            wire.REQUEST.pack(request_id, index, flags, len(slots))
            + struct.pack(f"<{len(slots)}H", *slots)
            + (b"" if targets is None else wire.pack_targets(list(targets)))
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
                if status == wire.CATALOG:
                    catalog = await wire.read_json(self.reader)
                    if self.on_catalog is not None:
                        self.on_catalog(catalog)  # swapped in before the acknowledgement: no await between
                    self.writer.write(wire.REQUEST.pack(request_id, 0, wire.CATALOG_ACK, 0))
                    continue
                if request_id in self.admin_pending:
                    error = await wire.read_json(self.reader) if status != wire.OK else None
                    self._admin_answer(self.admin_pending.pop(request_id), error)
                    continue
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

    @staticmethod
    def _admin_answer(future: asyncio.Future[None], error: dict[str, Any] | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(
                ServiceError(
                    error["message"], detail=error["detail"], status=error.get("status"), code=error.get("code")
                )
            )

    def _answer(self, request_id: int, status: int, timings: list, attention: bytes, error: dict | None) -> None:
        future, slots, model, relevance = self.pending.pop(request_id)
        if error is not None:
            self.free.extend(slots)
            if not future.done():
                cls = Overloaded if status == wire.OVERLOADED else Unavailable
                retry = RETRY_AFTER_S if status in (wire.OVERLOADED, wire.UNAVAILABLE) else None  # not a fault
                future.set_exception(cls(error["message"], detail=error["detail"], retry_after=retry))
            return
        meta = model.meta
        maps = relevance_maps = None
        if attention and relevance:
            relevance_maps = np.frombuffer(attention, np.float32).reshape(len(slots), *meta.grid)
        elif attention:
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
                relevance=None if relevance_maps is None else relevance_maps[i],
            )
            for i, (slot, (queue_ms, compute_ms, batch_size)) in enumerate(zip(slots, timings, strict=True))
        ]
        self.free.extend(slots)
        if not future.done():
            future.set_result(results)

    def _engine_gone(self) -> None:
        if self.alive and not self.closing:
            log.error("the inference engine closed the connection; answering 503 until the server restarts")
        self.alive = False
        for future, slots, _, _ in self.pending.values():
            self.free.extend(slots)  # nobody reads them any more
            if not future.done():
                future.set_exception(Unavailable("the inference engine stopped; retry shortly"))
        self.pending.clear()
        for admin in self.admin_pending.values():
            if not admin.done():
                admin.set_exception(Unavailable("the inference engine stopped; retry shortly"))
        self.admin_pending.clear()

    async def close(self) -> None:
        self.closing = True  # the reader, cancelled here, ends as if the engine had gone: that is no error now
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

    def __init__(self, link: EngineLink, model: LoadedModel, policy: BatchPolicy) -> None:
        self.link = link
        self.index = version_id(model)
        self.model = model
        self.policy = policy

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def check_room(self, count: int) -> None:
        """The engine's queue is not visible here; only this worker's own slots are."""
        self.link.check_slots(count)

    async def submit_many(
        self, images: Sequence[np.ndarray], *, with_attention: bool, targets: Targets = None, source: int = 0
    ) -> list[Result]:
        try:
            return await asyncio.wait_for(
                self.link.infer(self.model, self.index, images, with_attention, targets), self.policy.timeout_s + 5
            )
        except TimeoutError:  # the engine's own timeout answers first; this one only guards a stuck engine
            raise Unavailable("the inference engine did not answer in time; retry shortly") from None

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
    state.attach(link, link, functools.partial(RemoteBatcher, link), link.welcome["default"])
    apply_catalog(state, link.welcome, start=False)
    link.on_catalog = functools.partial(apply_catalog, state)


def apply_catalog(state: ServiceState, catalog: dict[str, Any], *, start: bool = True) -> None:
    """Serve what the engine's catalog lists: versions new to this worker swapped in (metadata only: the engine
    has verified the graphs), models gone unloaded, unavailable ones noted. `start` False: at the welcome, before
    the app starts its batchers."""
    served = state.models().models
    models: list[tuple[LoadedModel, BatchPolicy | None]] = []
    for entry in catalog["models"]:
        meta = ArtifactMetadata.model_validate(entry["meta"])
        current = served.get(meta.name)
        if current is not None and version_id(current) == entry["id"]:
            models.append((current, None))
            continue
        model = LoadedModel(
            meta=meta,
            directory=Path(entry["directory"]),
            classify=None,
            attention=None,
            provider=entry["provider"],
            load_seconds=entry["load_seconds"],
            warmed_up=True,
            extra={VERSION_ID: entry["id"]},
            fingerprint=entry["fingerprint"],
        )
        models.append((model, BatchPolicy(**entry["policy"])))
    state.serve_catalog(
        models,
        unavailable={name: LoadFailure(error, "") for name, error in catalog["unavailable"].items()},
        unloaded=set(catalog["unloaded"]),
        start=start,
    )
