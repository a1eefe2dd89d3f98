"""`python -m service` (or `vitserve`): serve the model repository over HTTP.

Flags override the `VITSERVE_*` environment. Models are loaded and warmed up before the port opens, so a
missing or broken artifact is a clear message and exit code 2, not a server that half works.

On SIGTERM (or Ctrl+C) readiness turns 503 at once; requests are still served for `VITSERVE_DRAIN_DELAY_S`, so a
load balancer sees the pod go unready and stops sending before the listener closes; then uvicorn stops
accepting, lets in-flight requests finish for up to `VITSERVE_SHUTDOWN_GRACE_S`, and the process exits 0. A
second signal cuts the drain short.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service.procs.bootstrap import EXIT_CONFIG, STARTUP_FAILURE, event_loop, exit_with_parent, freeze_heap

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from service.core.state import ServiceState
    from service.http.protocol import ConnectionPolicy
    from service.settings import Settings


def program_name() -> str:
    """How the user started the server, for --help: the `vitserve` console script, or `python -m service`
    (whose argv[0] is this file's path, meaningless to them)."""
    return "vitserve" if Path(sys.argv[0]).name == "vitserve" else "python -m service"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program_name(), description="Serve ViT artifacts over HTTP.")
    p.add_argument("--model-dir", help="model repository (VITSERVE_MODEL_DIR)")
    p.add_argument("--default-model", help="model for the routes without a name (VITSERVE_DEFAULT_MODEL)")
    p.add_argument("--host", help="bind address (VITSERVE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (VITSERVE_PORT, default 8000)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], help="execution provider (VITSERVE_PROVIDER)")
    p.add_argument("--threads", type=int, help="intra-op threads per session (VITSERVE_THREADS)")
    return p


def draining_server(
    config: uvicorn.Config,
    state: ServiceState,
    policy: ConnectionPolicy,
    drain_delay_s: float,
    on_started: Callable[[], None] | None = None,
) -> uvicorn.Server:
    """A uvicorn server whose first SIGTERM/SIGINT turns readiness off, answers with `Connection: close` from
    then on, and keeps serving `drain_delay_s`."""
    import uvicorn

    from service.http.protocol import start_draining

    class DrainingServer(uvicorn.Server):
        drain_until: float | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not state.shutting_down
            state.shutting_down = True  # /readyz and /v2/health/ready answer 503 from now on
            start_draining(policy, self.server_state.connections)
            if first and drain_delay_s > 0:
                logging.getLogger("vitserve").warning(
                    "signal %d: readiness is off; serving %g s more before closing the listener", sig, drain_delay_s
                )
                self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does: exit code 0
                self.drain_until = time.monotonic() + drain_delay_s
                return
            self.close_listeners()
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:
                on_started()

        def close_listeners(self) -> None:
            # Now, not at uvicorn's next tick (up to 0.1 s later): a client told `Connection: close` reconnects at
            # once, and a connection still in the listener's backlog when it closes is reset with its request
            # sent (tests/service/test_shutdown.py lost 15 of 16 that way); refused at connect, it retries cleanly.
            for listener in self.servers:
                listener.close()

        async def on_tick(self, counter: int) -> bool:
            if self.drain_until is not None and time.monotonic() >= self.drain_until:
                self.close_listeners()
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


def connection_limit(wanted: int) -> int:
    """`wanted`, kept below the file-descriptor limit (raised to its hard maximum first): a server out of
    descriptors cannot accept even a health probe. 64 descriptors stay for models, logs and the listener."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(1, min(wanted, soft - 64)) if soft != resource.RLIM_INFINITY else wanted


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, value in vars(args).items():
        if value is not None:
            os.environ[f"VITSERVE_{name.upper()}"] = str(value)

    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        # `msg` only: the input value could be an API key, and keys are never printed.
        problems = "; ".join(
            f"VITSERVE_{'_'.join(map(str, err['loc'])).upper() or 'SETTINGS'}: {err['msg']}" for err in e.errors()
        )
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return EXIT_CONFIG
    from service.obs.logs import setup_logging

    setup_logging(settings, "supervisor" if settings.worker_count > 1 else None)
    if settings.exit_with_parent:
        exit_with_parent()

    if settings.worker_count > 1:  # before the app's imports: the supervisor stays a small process
        from service.procs import supervisor

        return supervisor.run(settings)

    from service.app import create_app
    from service.core.budgets import tune_allocator
    from service.core.loading import load_repository
    from service.core.runtime import ProviderError
    from vit_artifact.metadata import ArtifactError

    tune_allocator()  # before the models load: large buffers from mmap, given back when freed
    try:
        repository = load_repository(settings)
    except (ArtifactError, ProviderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    app = create_app(settings, repository)
    logging.getLogger("vitserve").info(
        "serving %s on http://%s:%d (default model %s%s%s)",
        sorted(repository.models),
        settings.host,
        settings.port,
        repository.default,
        f"; unavailable: {sorted(repository.unavailable)}" if repository.unavailable else "",
        f"; {len(settings.api_keys)} API key(s) required" if settings.api_keys else "",
    )
    return serve(settings, app)


def serve(
    settings: Settings,
    app: FastAPI,
    sock: socket.socket | None = None,
    on_started: Callable[[], None] | None = None,
) -> int:
    """Run `app` under uvicorn with vitserve's connection layer until SIGTERM has drained it; on `sock` (an HTTP
    worker of multi-process mode shares the supervisor's listening socket) or on the settings' host and port."""
    import uvicorn

    from service.http.protocol import ConnectionPolicy, protocol_for
    from service.obs.logs import UVICORN_LOG_CONFIG

    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal; this handler turns that into
    # exit code 0, so an orchestrator sees a clean shutdown.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    policy = ConnectionPolicy(
        header_timeout_s=settings.header_timeout_s,
        max_connections=connection_limit(settings.max_connections),
        direct=app.state.direct,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=UVICORN_LOG_CONFIG,  # uvicorn's lines through service.obs.logs' handler: its format, request ids
        http=protocol_for(policy),
        access_log=False,  # service.http.gate.log_access writes every answer's line, ASGI and direct alike
        loop=event_loop(),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works (call_later)
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # a float works (wait_for)
    )
    server = draining_server(config, app.state.vitserve, policy, settings.drain_delay_s, on_started)
    freeze_heap()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C, re-raised by uvicorn after a graceful shutdown
        server.run(sockets=None if sock is None else [sock])
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
