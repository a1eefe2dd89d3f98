"""The inference engine process (multi-process mode): every model's onnxruntime sessions and dynamic batcher.

One engine serves every HTTP worker, so requests from all of them meet in one batcher per model (a GPU wants
one big batch, not N small ones), and the device has one owner. Workers connect over a Unix socket
(`service.engine_protocol`), hand over their slot pool, and send requests naming slots; each request goes
through the same `DynamicBatcher` as in single-process mode (bounded queue, all-or-nothing admission,
timeout, metrics), tagged with the worker it came from.

    python -m service.engine    (started by service.supervisor, never by hand)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import struct
import sys

import numpy as np

from service import engine_protocol as wire
from service.errors import Overloaded, ServiceError
from service.runtime import LoadedModel
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("vitserve.engine")


class Engine:
    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.names = sorted(state.models().models)  # a model's index in REQUEST messages
        self.workers: set[asyncio.Task] = set()

    def welcome(self) -> dict:
        repository = self.state.models()
        return {
            "pid": os.getpid(),
            "default": repository.default,
            "models": [
                {
                    "name": name,
                    "directory": str(repository.models[name].directory),
                    "provider": repository.models[name].provider,
                    "load_seconds": repository.models[name].load_seconds,
                }
                for name in self.names
            ],
            "unavailable": {name: failure.error for name, failure in repository.unavailable.items()},
        }

    async def serve_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.workers.add(task)
        pool = None
        running: set[asyncio.Task] = set()
        try:
            hello = await wire.read_json(reader)
            worker = int(hello["pid"])
            geometry = wire.SlotGeometry(**hello["geometry"])
            pool = wire.SlotPool.attach(f"/proc/{worker}/fd/{hello['fd']}", int(hello["count"]), geometry)
            writer.write(wire.pack_json(self.welcome()))
            log.info("worker %d connected (%d slots)", worker, pool.count)
            while True:
                request_id, model_index, flags, count = wire.REQUEST.unpack(await reader.readexactly(wire.REQUEST.size))
                slots = struct.unpack(f"<{count}H", await reader.readexactly(2 * count))
                run = self._run(writer, pool, worker, request_id, model_index, flags, slots)
                job = asyncio.get_running_loop().create_task(run)
                running.add(job)
                job.add_done_callback(running.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("a worker disconnected")
        finally:
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
    ) -> None:
        timings, attention, error = b"", b"", b""
        status = wire.OK
        try:
            model = self._model(model_index)
            shape = (3, *model.meta.input_size)
            images = [pool.pixels(slot, shape) for slot in slots]
            batcher = self.state.batchers[model.name]
            results = await batcher.submit_many(images, with_attention=bool(flags & wire.ATTENTION), source=worker)
            classes = len(model.meta.labels)
            for slot, result in zip(slots, results, strict=True):
                pool.logits(slot, classes)[:] = result.logits
            timings = b"".join(wire.TIMING.pack(r.queue_ms, r.compute_ms, r.batch_size) for r in results)
            if flags & wire.ATTENTION:
                attention = b"".join(np.ascontiguousarray(r.attentions, np.float32).tobytes() for r in results)
        except ServiceError as e:
            status = wire.OVERLOADED if isinstance(e, Overloaded) else wire.UNAVAILABLE
            error = wire.pack_json({"message": e.message, "detail": e.detail})
        except Exception as e:  # a runtime fault fails this request, not the engine
            log.exception("request %d of worker %d failed", request_id, worker)
            status = wire.FAILED
            error = wire.pack_json({"message": f"inference failed: {type(e).__name__}", "detail": None})
        writer.write(wire.REPLY.pack(request_id, status, len(slots), len(attention)) + timings + attention + error)

    def _model(self, index: int) -> LoadedModel:
        return self.state.models().models[self.names[index]]


async def run(settings: Settings, socket_path: str, ready_fd: int) -> None:
    from service.app import load_repository

    state = ServiceState(settings, serves_http=False)
    state.repository = await asyncio.get_running_loop().run_in_executor(None, load_repository, settings)
    state.start_batchers()
    engine = Engine(state)
    server = await asyncio.start_unix_server(engine.serve_worker, path=socket_path)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    os.write(ready_fd, json.dumps({"models": engine.names}).encode())
    os.close(ready_fd)
    log.info("engine ready: %s", engine.names)
    await stop.wait()
    # The supervisor stops the engine after the workers have drained: nothing should be in flight now.
    server.close()
    for task in list(engine.workers):
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*engine.workers, return_exceptions=True)
    await state.stop_batchers()
    state.close()


def main() -> int:
    from service.__main__ import EXIT_CONFIG, exit_with_parent
    from service.logs import setup_logging
    from service.memory import tune_allocator
    from service.runtime import ProviderError
    from vit_artifact.metadata import ArtifactError

    settings = Settings()
    setup_logging(settings, "engine")
    exit_with_parent()
    tune_allocator()
    if importlib.util.find_spec("uvloop"):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(run(settings, os.environ["VITSERVE_ENGINE_SOCKET"], int(os.environ["VITSERVE_READY_FD"])))
    except (ArtifactError, ProviderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
