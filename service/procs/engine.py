"""The inference engine process (multi-process mode): every model's onnxruntime sessions and dynamic batcher.

One engine serves every HTTP worker, so requests from all of them meet in one batcher per model (a GPU wants
one big batch, not N small ones), and the device has one owner. Workers connect over a Unix socket
(`service.procs.wire`), hand over their slot pool, and send requests naming slots; each request goes
through the same `DynamicBatcher` as in single-process mode (bounded queue, all-or-nothing admission,
timeout, metrics), tagged with the worker it came from.

Model versions change here only (hot reload's poll, the repository extension's load and unload, both through
`service.core.reload.RepositoryWatcher`), and each change is an atomic swap across processes:

1. the engine loads and verifies the new version as at start; a broken one is refused and nothing changes;
2. it swaps the version into its own state: the new one gets a new **version id**, the id REQUEST messages
   name; the old version keeps its id, its batcher and its sessions while requests may still name it
   (`RETAIN_S` past the request timeout), so a request a worker admitted before the change finishes on it;
3. it sends every worker a CATALOG (each served version's id and metadata, what is unavailable or unloaded)
   and waits for each to acknowledge it: a worker swaps in metadata-only versions (what it needs to decode and
   preprocess) exactly as one process swaps whole ones. Only then does an admin's load or unload return, so
   the next request to any worker sees the change.

    python -m service.procs.engine    (started by service.procs.supervisor, never by hand)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import struct
import sys
from typing import Any

import numpy as np

from service.core.runtime import LoadedModel
from service.core.state import ServiceState
from service.errors import Overloaded, ServiceError, Unavailable
from service.procs import wire
from service.procs.bootstrap import EXIT_CONFIG, ChildEnv, exit_with_parent, freeze_heap, use_event_loop
from service.settings import Settings
from vit_artifact.metadata import ArtifactError

log = logging.getLogger("vitserve.engine")

# A replaced version stays reachable this long past the request timeout. Only a request a worker looked up before
# the switch and had not yet sent (it was being decoded) can still name it: once here, a request holds its version.
RETAIN_S = 5.0
ACK_S = 10.0  # how long a change waits for each worker to acknowledge the new catalog


class Engine:
    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.versions: dict[int, LoadedModel] = {}  # by version id: every version REQUEST messages may name
        self.current: dict[str, int] = {}  # each served model's version id
        self.last_id = 0
        self.workers: set[asyncio.Task] = set()
        self.links: dict[int, asyncio.StreamWriter] = {}  # by worker pid
        self.geometries: dict[int, wire.SlotGeometry] = {}
        self.acks: dict[tuple[int, int], asyncio.Future[None]] = {}  # (worker pid, catalog number)
        self.catalogs = 0

    def catalog(self) -> dict[str, Any]:
        """What is served now, with a version id for each served version (new versions get theirs here)."""
        repository = self.state.models()
        for name, model in repository.models.items():
            if self.versions.get(self.current.get(name, 0)) is not model:
                self._retain(self.current.get(name))
                self.last_id = self.last_id % 0xFFFF + 1  # REQUEST's u16; an id comes round again after 65535 loads
                self.versions[self.last_id] = model
                self.current[name] = self.last_id
        for name in set(self.current) - set(repository.models):  # unloaded
            self._retain(self.current.pop(name))
        return {
            "default": repository.default,
            "models": [
                {
                    "id": self.current[name],
                    "directory": str(model.directory),
                    "provider": model.provider,
                    "load_seconds": model.load_seconds,
                    "fingerprint": model.fingerprint,
                    "policy": dataclasses.asdict(self.state.batchers.running[name].policy),
                    "meta": model.meta.model_dump(mode="json"),
                }
                for name, model in sorted(repository.models.items())
            ],
            "unavailable": {name: failure.error for name, failure in repository.unavailable.items()},
            "unloaded": sorted(self.state.unloaded),
        }

    def _retain(self, version_id: int | None) -> None:
        """A replaced or unloaded version answers requests that name it a while longer, then is let go."""
        if version_id is not None:
            later = self.state.settings.request_timeout_s + RETAIN_S
            asyncio.get_running_loop().call_later(later, self.versions.pop, version_id, None)

    def welcome(self) -> dict[str, Any]:
        return {"pid": os.getpid(), **self.catalog()}

    async def broadcast(self) -> None:
        """Tell every worker what is served now, and wait until each has switched (or `ACK_S` has passed)."""
        self.catalogs = self.catalogs % 2**32 + 1
        number = self.catalogs
        message = wire.REPLY.pack(number, wire.CATALOG, 0, 0) + wire.pack_json(self.catalog())
        keys = [(pid, number) for pid in self.links]
        for key in keys:
            self.acks[key] = asyncio.get_running_loop().create_future()
            self.links[key[0]].write(message)
        if keys:
            _, late = await asyncio.wait([self.acks[key] for key in keys], timeout=ACK_S)
            if late:
                log.warning("%d workers did not acknowledge the new model catalog in %g s", len(late), ACK_S)
        for key in keys:
            del self.acks[key]

    def check_fits(self, model: LoadedModel) -> None:
        """Refuse a version whose input or classes do not fit the workers' slots (sized at start)."""
        meta = model.meta
        for geometry in self.geometries.values():
            if 3 * meta.input_size[0] * meta.input_size[1] > geometry.input_floats or len(meta.labels) > (
                geometry.output_floats
            ):
                raise ArtifactError(
                    f"model {model.name}: input 3x{meta.input_size[0]}x{meta.input_size[1]} with "
                    f"{len(meta.labels)} classes does not fit the HTTP workers' input slots, sized at start for "
                    f"{geometry.input_floats} input and {geometry.output_floats} output values; restart the "
                    "server to serve it"
                )

    async def serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.workers.add(task)
        pool = None
        running: set[asyncio.Task] = set()
        worker = 0
        try:
            hello = await wire.read_json(reader)
            worker = int(hello["pid"])
            geometry = wire.SlotGeometry(**hello["geometry"])
            pool = wire.SlotPool.attach(f"/proc/{worker}/fd/{hello['fd']}", int(hello["count"]), geometry)
            writer.write(wire.pack_json(self.welcome()))
            self.links[worker] = writer  # from now on it gets every CATALOG (no await since the welcome's)
            self.geometries[worker] = geometry
            log.info("worker %d connected (%d slots)", worker, pool.count)
            while True:
                request_id, model_index, flags, count = wire.REQUEST.unpack(await reader.readexactly(wire.REQUEST.size))
                if flags & wire.CATALOG_ACK:
                    ack = self.acks.get((worker, request_id))
                    if ack is not None and not ack.done():
                        ack.set_result(None)
                    continue
                if flags & wire.ADMIN:
                    command = await wire.read_json(reader)
                    run = self._admin(writer, request_id, command)
                else:
                    slots = struct.unpack(f"<{count}H", await reader.readexactly(2 * count))
                    targets = (
                        wire.unpack_targets(await reader.readexactly(4 * count)) if flags & wire.RELEVANCE else None
                    )
                    run = self._run(writer, pool, worker, request_id, model_index, flags, slots, targets)
                job = asyncio.get_running_loop().create_task(run)
                running.add(job)
                job.add_done_callback(running.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("a worker disconnected")
        except asyncio.CancelledError:  # the engine is stopping (`run`); ending here keeps the stream server quiet
            log.info("closing the link of worker %d", worker)
        finally:
            self.links.pop(worker, None)
            self.geometries.pop(worker, None)
            for (pid, _), ack in self.acks.items():  # a worker gone is no longer waited for
                if pid == worker and not ack.done():
                    ack.set_result(None)
            for job in running:  # nobody waits for these answers any more; unqueued images are skipped
                job.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            writer.close()
            if pool is not None:
                pool.close()
            self.workers.discard(task)

    async def _run(
        self,
        writer: asyncio.StreamWriter,
        pool: wire.SlotPool,
        worker: int,
        request_id: int,
        model_index: int,
        flags: int,
        slots: tuple[int, ...],
        targets: list[int] | None = None,
    ) -> None:
        timings, attention, error = b"", b"", b""
        status = wire.OK
        try:
            model = self.versions.get(model_index)
            if model is None:
                raise Unavailable("that model version is no longer served; retry")
            shape = (3, *model.meta.input_size)
            images = [pool.pixels(slot, shape) for slot in slots]
            with_attention = bool(flags & wire.ATTENTION)
            results = await self.state.infer_many(
                model, images, with_attention=with_attention, targets=targets, source=worker
            )
            classes = len(model.meta.labels)
            for slot, result in zip(slots, results, strict=True):
                pool.logits(slot, classes)[:] = result.logits
            timings = b"".join(wire.TIMING.pack(r.queue_ms, r.compute_ms, r.batch_size) for r in results)
            if targets is not None:  # relevance maps take the attention bytes' place
                attention = b"".join(np.ascontiguousarray(r.relevance, np.float32).tobytes() for r in results)
            elif flags & wire.ATTENTION:
                attention = b"".join(np.ascontiguousarray(r.attentions, np.float32).tobytes() for r in results)
        except ServiceError as e:
            status = wire.OVERLOADED if isinstance(e, Overloaded) else wire.UNAVAILABLE
            error = wire.pack_json({"message": e.message, "detail": e.detail})
        except Exception as e:  # a runtime fault fails this request, not the engine
            log.exception("request %d of worker %d failed", request_id, worker)
            status = wire.FAILED
            error = wire.pack_json({"message": f"inference failed: {type(e).__name__}", "detail": None})
        writer.write(wire.REPLY.pack(request_id, status, len(slots), len(attention)) + timings + attention + error)

    async def _admin(self, writer: asyncio.StreamWriter, request_id: int, command: dict[str, Any]) -> None:
        """A worker's repository-extension call: load or unload a model, the answer after the broadcast; or a
        readiness ping, answered at once (that this loop runs is what the worker asks)."""
        admin = self.state.admin
        assert admin is not None
        status, error = wire.OK, b""
        try:
            if command["op"] == "ping":
                pass
            elif command["op"] == "load":
                await admin.load_model(command["name"])
            else:
                await admin.unload_model(command["name"])
        except ServiceError as e:
            status = wire.FAILED
            error = wire.pack_json({"message": e.message, "detail": e.detail, "status": e.status, "code": e.code})
        except Exception as e:
            log.exception("repository %s of %s failed", command["op"], command["name"])
            status = wire.FAILED
            error = wire.pack_json({"message": f"{command['op']} failed: {type(e).__name__}", "detail": None})
        writer.write(wire.REPLY.pack(request_id, status, 0, 0) + error)


async def run(settings: Settings, socket_path: str, ready_fd: int) -> None:
    from service.core.loading import load_repository, version_loader
    from service.core.reload import RepositoryWatcher

    state = ServiceState(settings, serves_http=False)
    state.repository = await asyncio.get_running_loop().run_in_executor(None, load_repository, settings)
    state.start_batchers()
    engine = Engine(state)
    watcher = RepositoryWatcher(
        state,
        version_loader(settings),
        settings.reload_interval_s,
        check=engine.check_fits,
        on_change=engine.broadcast,
    )
    state.admin = watcher
    if settings.reload_interval_s > 0:
        watcher.start()
    freeze_heap()
    server = await asyncio.start_unix_server(engine.serve_worker, path=socket_path)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)  # SIGINT is ignored (`main`)
    names = sorted(state.models().models)
    os.write(ready_fd, json.dumps({"models": names}).encode())
    os.close(ready_fd)
    log.info("engine ready: %s", names)
    await stop.wait()
    # The supervisor stops the engine after the workers have drained: nothing should be in flight now.
    state.shutting_down = True
    await watcher.stop()
    server.close()
    for task in list(engine.workers):
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*engine.workers, return_exceptions=True)
    await state.stop_batchers()
    state.close()


def main() -> int:
    from service.core.budgets import tune_allocator
    from service.core.runtime import ProviderError
    from service.obs.logs import setup_logging
    from vit_artifact.metadata import ArtifactError

    # Only the supervisor stops the engine: SIGTERM, once every worker has drained (they need the engine until
    # then). A Ctrl+C in a terminal sends SIGINT to every process of the group; the supervisor's drain answers it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings()
    setup_logging(settings, "engine")
    exit_with_parent()
    tune_allocator()
    use_event_loop()
    env = ChildEnv.from_environ()
    assert env.ready_fd is not None, "started by service.procs.supervisor"
    try:
        asyncio.run(run(settings, str(env.engine_socket), env.ready_fd))
    except (ArtifactError, ProviderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
