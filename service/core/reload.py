"""Model hot reload: poll the model repository, load what changed in the background, swap it in atomically.

Every `VITSERVE_RELOAD_INTERVAL_S` the watcher fingerprints each model directory (`runtime.fingerprint`: the
bytes of artifact.json and serving.json, every file's size and modification time). A directory whose
fingerprint differs from the served version's, and has stayed the same for one more poll (so a copy still in
progress is not loaded half-written), is loaded in a worker thread exactly as at start: hashes verified,
sessions built, the warm-up run checked against the metadata, serving.json read. Only then is it swapped in, on
the event loop, with `ServiceState.swap`: new requests go to the new version, requests that already looked up
the old one finish on it. A version that fails to load is rejected and logged; the old one keeps serving, and
the same files are not tried again until they change. A new directory is a new model; a removed one is left
served (unload it with the repository extension). `vitserve_model_reload_total{model,outcome}` counts `loaded`
and `rejected`.

The watcher also carries out the repository extension's `load` (the same load, verification and swap, at once)
and `unload` (`ServiceState.unload`; the poll then leaves that model alone until it is loaded again). One
change at a time: polls and admin calls take turns. In multi-process mode the watcher runs in the engine, and
`on_change` tells every HTTP worker what is now served (service/procs/engine.py) before a load or unload returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.core.batching import BatchPolicy
from service.core.runtime import LoadedModel, discover, fingerprint, public_message
from service.core.state import ServiceState
from service.errors import BadRequest, NotFound
from service.obs.metrics import METRICS

log = logging.getLogger("vitserve.reload")

Loader = Callable[[Path], tuple[LoadedModel, BatchPolicy]]


class Rejected(Exception):
    """A new version failed to load; the old one (if any) keeps serving. The message is safe for clients."""


class RepositoryWatcher:
    def __init__(
        self,
        state: ServiceState,
        load: Loader,
        interval_s: float,
        *,
        check: Callable[[LoadedModel], None] | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`check` may refuse a loaded version (an ArtifactError) before it is swapped in; `on_change` runs after
        every swap or unload (the engine tells its workers)."""
        self.state = state
        self.load = load
        self.interval_s = interval_s
        self.check = check
        self.on_change = on_change
        self.lock = asyncio.Lock()
        repository = state.models()
        # What each name was last loaded (or rejected) from; a different fingerprint is a new version.
        self.seen: dict[str, str] = {
            **{name: failure.fingerprint for name, failure in repository.unavailable.items()},
            **{name: model.fingerprint for name, model in repository.models.items()},
        }
        self.pending: dict[str, str] = {}  # changed, waiting one poll to be sure the writer is done
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reload")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="model-reload")
        log.info("polling %s for new model versions every %g s", self.state.settings.model_dir, self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while not self.state.shutting_down:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except Exception:  # a poll that fails (the directory vanished...) must not end polling
                log.exception("polling the model repository failed")

    def _scan(self) -> dict[str, tuple[Path, str]]:
        settings = self.state.settings
        paths = [p for p in discover(settings.model_dir) if settings.models is None or p.name in settings.models]
        return {p.name: (p, fingerprint(p)) for p in paths}

    async def load_model(self, name: str) -> None:
        """The repository extension's load: `name`'s directory, verified and warmed up as at start, swapped in.
        Raises NotFound for a name the repository lacks, BadRequest (with the reason) for a version that fails
        to load, in which case what was served keeps serving. A model served from unchanged files is left as is."""
        async with self.lock:
            current = await asyncio.get_running_loop().run_in_executor(self.pool, self._scan)
            if name not in current:
                raise NotFound(
                    f"no model {name!r} in the model repository; POST /v2/repository/index lists them",
                    detail={"models": sorted(current)},
                )
            path, print_ = current[name]
            served = self.state.models().models.get(name)
            if served is not None and print_ and print_ == served.fingerprint:
                return
            self.pending.pop(name, None)
            try:
                await self._swap_in(name, path, print_)
            except Rejected as e:
                raise BadRequest(f"failed to load model {name!r}: {e}") from None

    async def unload_model(self, name: str) -> None:
        """The repository extension's unload: new requests for `name` get 404; those admitted finish."""
        async with self.lock:
            repository = self.state.models()
            if name not in repository.models and name not in repository.unavailable:
                if name in self.state.unloaded:
                    return
                raise NotFound(f"model {name!r} is not loaded", detail={"available": sorted(repository.models)})
            old = self.state.unload(name)
            if old is not None:
                with contextlib.suppress(KeyError):
                    METRICS.load_seconds.remove(name, old.meta.version)
            log.info("model %s: unloaded", name)
            if self.on_change is not None:
                await self.on_change()

    async def poll(self) -> list[str]:
        """One look at the repository; returns the names of the models loaded or rejected in it."""
        loop = asyncio.get_running_loop()
        current = await loop.run_in_executor(self.pool, self._scan)
        acted = []
        for name, (path, print_) in current.items():
            if name in self.state.unloaded or not print_ or print_ == self.seen.get(name):
                self.pending.pop(name, None)
                continue
            if self.pending.get(name) != print_:
                self.pending[name] = print_  # changed since the last poll: the writer may not be done
                continue
            del self.pending[name]
            async with self.lock:
                await self.reload(name, path, print_)
            acted.append(name)
        return acted

    async def reload(self, name: str, path: Path, print_: str) -> None:
        with contextlib.suppress(Rejected):  # logged and counted; the old version keeps serving
            await self._swap_in(name, path, print_)

    async def _swap_in(self, name: str, path: Path, print_: str) -> None:
        old = self.state.models().models.get(name)
        serving = f"version {old.meta.version} keeps serving" if old else "the model stays unavailable"
        try:
            model, policy = await asyncio.get_running_loop().run_in_executor(self.pool, self.load, path)
            if self.check is not None:
                self.check(model)
        except Exception as e:  # ArtifactError mostly; anything else is as much a reason to keep the old one
            self.seen[name] = print_
            METRICS.reloads.labels(name, "rejected").inc()
            log.error("model %s: the new files in %s were rejected, %s: %s", name, path, serving, e)
            raise Rejected(f"{public_message(e, path)}; {serving}") from e
        self.seen[name] = model.fingerprint  # as loaded: a change made during the load is picked up next
        if self.state.shutting_down:
            return
        self.state.swap(model, policy)
        if self.on_change is not None:  # before the counters: "loaded" means every process serves it
            await self.on_change()
        if old is not None and old.meta.version != model.meta.version:
            with contextlib.suppress(KeyError):  # the gauge describes what is served: drop the old version's series
                METRICS.load_seconds.remove(name, old.meta.version)
        METRICS.load_seconds.labels(name, model.meta.version).set(model.load_seconds)
        METRICS.reloads.labels(name, "loaded").inc()
        if old is None:
            log.info("model %s: new, version %s loaded from %s", name, model.meta.version, path)
        else:
            log.info("model %s: version %s swapped in for version %s", name, model.meta.version, old.meta.version)
