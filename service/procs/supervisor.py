"""Multi-process mode (`VITSERVE_WORKERS` > 1): one inference engine, N HTTP workers, and this supervisor.

```
                  ┌──────────── worker 1: HTTP, auth, limits, decode, preprocess, encode ───┐
clients ── :8000 ─┤          (one listening socket, shared; the kernel spreads connections)  ├─ slots ─┐
                  └──────────── worker N ───────────────────────────────────────────────────┘  (memfd)  │
                                                                                                        ▼
                             engine: every model's onnxruntime sessions + one dynamic batcher per model
```

The supervisor opens the listening socket, starts the engine (which loads and warms up every model) and then
the workers, and watches them:

- ready: `/readyz` answers 200 only while the file `all-ready` exists, which the supervisor keeps while the
  engine and every worker are up;
- a worker that dies is replaced (its metrics are merged into the totals, its connections are lost with it);
- an engine that dies ends the server with exit code 1: the workers answer what was waiting on it with 503
  and drain, and the orchestrator restarts the whole server (the engine is the models: restarting it alone
  would be a full restart anyway);
- SIGTERM/SIGINT: readiness off, every worker drains as in single-process mode (`VITSERVE_DRAIN_DELAY_S`,
  `Connection: close`, `VITSERVE_SHUTDOWN_GRACE_S`), then the engine stops; exit 0.

Metrics of every process are summed by prometheus_client's multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.procs.bootstrap import EXIT_CONFIG, EXIT_FAILURE, ChildEnv
from service.settings import Settings

log = logging.getLogger("vitserve.supervisor")

POLL_S = 0.1


class Child:
    """A child process and the pipe it writes to once it is ready."""

    def __init__(self, role: str, command: list[str], contract: ChildEnv, pass_fds: tuple[int, ...] = ()) -> None:
        self.role = role
        read, write = os.pipe()
        env = {**os.environ, **dataclasses.replace(contract, ready_fd=write).environ()}
        self.process = subprocess.Popen(command, env=env, pass_fds=(write, *pass_fds))
        os.close(write)
        self.ready_pipe = read

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self) -> bytes | None:
        """What the child wrote when it became ready; None if it exited first."""
        chunks = []
        while chunk := os.read(self.ready_pipe, 4096):
            chunks.append(chunk)
            if self.role != "engine":  # a worker writes one byte and keeps the pipe; the engine closes it
                break
        os.close(self.ready_pipe)
        return b"".join(chunks) or None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.worker_count
        self.contract = ChildEnv(Path(tempfile.mkdtemp(prefix="vitserve-")))
        self.runtime = self.contract.runtime
        self.contract.metrics_dir.mkdir()
        self.contract.shm_registry_dir.mkdir()
        self.all_ready = self.contract.all_ready_file
        self.listener = socket.create_server((settings.host, settings.port), backlog=2048)
        self.listener.set_inheritable(True)
        self.workers: dict[int, Child] = {}  # by index
        self.engine: Child | None = None
        self.stopping = False

    def spawn_worker(self, index: int) -> Child:
        contract = dataclasses.replace(self.contract, listen_fd=self.listener.fileno(), worker_index=index)
        child = Child("worker", [sys.executable, "-m", "service.procs.worker"], contract, (self.listener.fileno(),))
        self.workers[index] = child
        return child

    def wait_worker(self, index: int) -> bool:
        child = self.workers[index]
        if child.wait_ready() is None:
            return False
        log.info("worker %d (pid %d) ready", index, child.pid)
        return True

    def start_worker(self, index: int) -> bool:
        self.spawn_worker(index)
        return self.wait_worker(index)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        try:
            # Everything starts at once: the workers import their libraries (about a second) while the engine
            # loads and warms up the models, and connect as soon as its socket is there.
            self.engine = Child("engine", [sys.executable, "-m", "service.procs.engine"], self.contract)
            for index in range(self.count):
                self.spawn_worker(index)
            said = self.engine.wait_ready()
            if said is None:  # the engine could not load the models: the workers have served nothing yet
                for child in self.workers.values():
                    child.process.kill()
                    child.process.wait()
                return self.engine.process.wait() or EXIT_CONFIG
            log.info("engine %d ready: %s", self.engine.pid, json.loads(said)["models"])
            for index in range(self.count):
                if not self.wait_worker(index) and not self.stopping:
                    log.error("worker %d failed to start; stopping", index)
                    self.stopping = True
                    self._shutdown()
                    return EXIT_CONFIG
            self.all_ready.touch()
            log.info(
                "serving on http://%s:%d with %d workers and one engine",
                self.settings.host,
                self.settings.port,
                self.count,
            )
            code = self._watch()
            clean = self._shutdown()
            return code or (0 if clean else EXIT_FAILURE)
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _watch(self) -> int:
        assert self.engine is not None
        while not self.stopping:
            time.sleep(POLL_S)
            if self.engine.process.poll() is not None:
                log.error(
                    "the engine (pid %d) exited with %s; stopping the server",
                    self.engine.pid,
                    self.engine.process.returncode,
                )
                self.all_ready.unlink(missing_ok=True)
                return EXIT_FAILURE
            for index, child in list(self.workers.items()):
                if child.process.poll() is not None and not self.stopping:
                    self._replace(index, child)
        return 0

    def _replace(self, index: int, dead: Child) -> None:
        from prometheus_client import multiprocess

        log.error("worker %d (pid %d) exited with %s; starting another", index, dead.pid, dead.process.returncode)
        self.all_ready.unlink(missing_ok=True)
        multiprocess.mark_process_dead(dead.pid, str(self.contract.metrics_dir))
        if self.start_worker(index):
            self.all_ready.touch()

    def _stop(self, sig: int, _frame: object) -> None:
        if self.stopping:  # a second signal: stop waiting for the drain
            for child in self.workers.values():
                child.signal(signal.SIGTERM)
            return
        log.info("signal %d: draining %d workers", sig, len(self.workers))
        self.stopping = True
        self.all_ready.unlink(missing_ok=True)

    def _shutdown(self) -> bool:
        """Workers drain first (they still need the engine for what is in flight), then the engine stops. True
        when every process exited 0 (drained), as a clean single-process server does."""
        self.all_ready.unlink(missing_ok=True)
        for child in self.workers.values():
            child.signal(signal.SIGTERM)
        limit = self.settings.drain_delay_s + self.settings.shutdown_grace_s + 10
        for child in self.workers.values():
            try:
                child.process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in %g s; killing it", child.pid, limit)
                child.process.kill()
        self.listener.close()
        if self.engine is not None:
            self.engine.signal(signal.SIGTERM)
            try:
                self.engine.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.engine.process.kill()
        codes = {c.pid: c.process.wait() for c in [*self.workers.values(), *([self.engine] if self.engine else [])]}
        unclean = {pid: code for pid, code in codes.items() if code != 0}
        if unclean:
            log.error("processes that did not exit cleanly (pid: exit code): %s", unclean)
        return not unclean


def run(settings: Settings) -> int:
    if settings.grpc_port:
        # The workers share the gRPC port with SO_REUSEPORT, which would as gladly share it with another server:
        # an exclusive bind first makes a port already in use an error here, as the HTTP port's is.
        try:
            socket.create_server((settings.host, settings.grpc_port)).close()
        except OSError as e:
            print(f"error: cannot serve gRPC on {settings.host}:{settings.grpc_port}: {e.strerror}", file=sys.stderr)
            return 3
    try:
        supervisor = Supervisor(settings)
    except OSError as e:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {e.strerror}", file=sys.stderr)
        return 3
    return supervisor.run()
