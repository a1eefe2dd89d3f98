"""An HTTP worker process (multi-process mode): the whole app, on the supervisor's listening socket, with its
models' inference forwarded to the engine (service.procs.engine_client).

    python -m service.procs.worker    (started by service.procs.supervisor, never by hand)

Server-wide limits are shared out: each of N workers takes 1/N of the concurrency limit, the connection cap
and the memory budgets, so the whole server keeps the totals the settings name.
"""

from __future__ import annotations

import math
import os
import socket
import sys

from service.procs.bootstrap import ChildEnv, exit_with_parent
from service.settings import Settings

# Input slots per worker: enough for its share of the engine's queue plus a batch being filled; each holds one
# image (3 x H x W float32: 12 KB for the default model, 602 KB for a 224 x 224 ViT).
MIN_SLOTS = 64


def share(settings: Settings, workers: int) -> Settings:
    """This worker's part of the server-wide limits."""
    part = {
        name: max(1, math.ceil(getattr(settings, name) / workers))
        for name in ("max_concurrent_requests", "max_connections", "body_budget_bytes", "decode_budget_bytes")
    }
    return settings.model_copy(update=part)


def main() -> int:
    from service.__main__ import serve
    from service.app import WorkerLink, create_app
    from service.core.budgets import tune_allocator
    from service.obs.logs import setup_logging, worker_role

    settings = Settings()
    workers = settings.worker_count
    env = ChildEnv.from_environ()
    assert env.listen_fd is not None and env.ready_fd is not None, "started by service.procs.supervisor"
    setup_logging(settings, worker_role(env.worker_index))
    exit_with_parent()  # the supervisor's death (even SIGKILL) drains and stops its workers
    tune_allocator()
    link = WorkerLink(env, slots=max(MIN_SLOTS, math.ceil(settings.max_queue_size / workers) + settings.max_batch_size))
    app = create_app(share(settings, workers), worker=link)
    listener = socket.socket(fileno=env.listen_fd)
    ready_fd = env.ready_fd

    def tell_the_supervisor() -> None:  # serving: the engine is attached and the socket is being accepted on
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    return serve(settings, app, listener, on_started=tell_the_supervisor)


if __name__ == "__main__":
    sys.exit(main())
