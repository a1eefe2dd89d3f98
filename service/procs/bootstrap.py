"""What every vitserve process shares at start: exit codes, dying with its parent, the event loop, and the
environment the supervisor hands its children (`ChildEnv`, the one home of those variable names)."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

EXIT_FAILURE = 1  # the engine died, or a child did not stop cleanly
EXIT_CONFIG = 2  # bad settings, or models that cannot be served
STARTUP_FAILURE = 3  # as uvicorn: the port could not be opened

_PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """Ask Linux for a SIGTERM (a graceful drain) when the parent exits: `make serve` runs the server as a child
    of make, and a supervisor's SIGTERM to make is not passed on; a worker or the engine outlives no supervisor."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        logging.getLogger("vitserve").warning("VITSERVE_EXIT_WITH_PARENT works on Linux only; ignored")
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def event_loop() -> str:
    """uvicorn's name of the event loop every process runs: uvloop where it is installed (the serve image has
    it), else asyncio's own."""
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def use_event_loop() -> None:
    """Make `asyncio.run` use `event_loop()` (the engine, which runs no uvicorn)."""
    if event_loop() == "uvloop":
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def freeze_heap() -> None:
    """Set what start-up made (libraries, models, the app) aside from the garbage collector, just before serving:
    a full collection otherwise walks all of it again, for the few objects each request leaves. Measured on the
    default model's V2 image requests (h2load, 64 connections, two interleaved 15 s runs each way): 2-3% more
    images/s and 2-3% less CPU per image."""
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class ChildEnv:
    """The supervisor's side of its contract with the engine and the workers, passed in the environment.

    `runtime` is the supervisor's private directory; every path below is in it. A worker also gets the listening
    socket's descriptor and its index; each child gets the descriptor of the pipe it signals readiness on."""

    runtime: Path
    listen_fd: int | None = None  # workers: the supervisor's listening socket
    worker_index: int | None = None  # workers
    ready_fd: int | None = None  # what the child writes to once it is ready

    ENGINE_SOCKET = "VITSERVE_ENGINE_SOCKET"
    ALL_READY_FILE = "VITSERVE_ALL_READY_FILE"
    SHM_REGISTRY_DIR = "VITSERVE_SHM_REGISTRY_DIR"
    METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name: it reads it too
    EXIT_WITH_PARENT = "VITSERVE_EXIT_WITH_PARENT"
    LISTEN_FD = "VITSERVE_LISTEN_FD"
    WORKER_INDEX = "VITSERVE_WORKER_INDEX"
    READY_FD = "VITSERVE_READY_FD"
    RUNTIME_DIR = "VITSERVE_RUNTIME_DIR"

    @property
    def engine_socket(self) -> Path:
        return self.runtime / "engine.sock"

    @property
    def all_ready_file(self) -> Path:
        """Present while every worker and the engine are up: readiness is the whole server's."""
        return self.runtime / "all-ready"

    @property
    def shm_registry_dir(self) -> Path:
        """The registry of system shared memory regions every worker reads."""
        return self.runtime / "shared-memory"

    @property
    def metrics_dir(self) -> Path:
        return self.runtime / "metrics"

    def environ(self) -> dict[str, str]:
        """The variables to add to a child's environment."""
        env = {
            self.RUNTIME_DIR: str(self.runtime),
            self.ENGINE_SOCKET: str(self.engine_socket),
            self.ALL_READY_FILE: str(self.all_ready_file),
            self.SHM_REGISTRY_DIR: str(self.shm_registry_dir),
            self.METRICS_DIR: str(self.metrics_dir),
            self.EXIT_WITH_PARENT: "1",
        }
        for name, value in ((self.LISTEN_FD, self.listen_fd), (self.WORKER_INDEX, self.worker_index)):
            if value is not None:
                env[name] = str(value)
        if self.ready_fd is not None:
            env[self.READY_FD] = str(self.ready_fd)
        return env

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ChildEnv:
        """A child's view of the contract (KeyError: not started by the supervisor)."""
        env = os.environ if environ is None else environ

        def number(name: str) -> int | None:
            return int(env[name]) if name in env else None

        return cls(
            runtime=Path(env[cls.RUNTIME_DIR]),
            listen_fd=number(cls.LISTEN_FD),
            worker_index=number(cls.WORKER_INDEX),
            ready_fd=number(cls.READY_FD),
        )
