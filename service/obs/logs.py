"""Logging for every process of the server (one process; or supervisor, engine and HTTP workers): one handler on
stderr, text for people or JSON lines for log pipelines (`VITSERVE_LOG_FORMAT`), and the id of the request being
handled in every line logged while handling it.

The request id is a context variable that `service.http.middleware.RequestContextMiddleware` sets; uvicorn runs each
request in its own task, so the value belongs to that request and whatever it awaits. uvicorn's own logger
(`uvicorn.error`) goes through the same handler (`UVICORN_LOG_CONFIG`). The access line of every HTTP answer is
`vitserve.access`'s (`service.http.gate.log_access`, uvicorn's own is off): it carries the id too and, in JSON,
its parts as fields.

An access line is written for every request, so its cost is kept off the profile: the handler queues lines and a
daemon thread writes them every `FLUSH_INTERVAL_S`, a few KB per write(2) instead of a write and a flush per line
(a py-spy profile under load put the access line at 14% of the event loop's time, half of it in those syscalls);
WARNING and above are written at once, and everything queued is written at exit (`logging.shutdown`, which
Python runs at exit, SIGTERM included: every process here exits through `sys.exit` or a return). The text and
JSON formatters format the time once a second, not per line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import threading
import time
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

REQUEST_ID: ContextVar[str | None] = ContextVar("vitserve_request_id", default=None)
# uvicorn.Config(log_config=...): add no handlers of uvicorn's own, so its records reach the root handler here.
UVICORN_LOG_CONFIG: dict[str, Any] | None = None
# The access logger (service.http.gate.log_access); its record carries its parts as args, in this order.
ACCESS_LOGGER = "vitserve.access"
ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")
# How long a queued INFO line may wait before it is written (WARNING and above never wait).
FLUSH_INTERVAL_S = 0.1
# Lines are written in pieces of at most this many bytes, whole lines each: the processes of one server share
# stderr, and a pipe keeps a write this small in one piece, so two processes' lines never mix.
_ATOMIC_WRITE = select.PIPE_BUF


class RequestIdFilter(logging.Filter):
    """Give every record the current request id (None outside a request) and the process's role."""

    def __init__(self, role: str | None) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.role = self.role
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger[role]: message [request id]` (the id only inside a request; a traceback follows)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(where)s: %(message)s%(request_suffix)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's own `2024-05-01 12:00:00,123`, with the part to the second formatted once a second."""
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        role = getattr(record, "role", None)
        where = f"{record.name}[{role}]" if role else record.name
        request_id = getattr(record, "request_id", None)
        suffix = f" [{request_id}]" if request_id else ""
        if record.exc_info or record.exc_text or record.stack_info:  # a traceback: logging's own way
            record.where, record.request_suffix = where, suffix
            return super().format(record)
        # The format string above, without logging's %-formatting of the record's dict (most lines are access lines).
        record.message = message = record.getMessage()
        record.asctime = asctime = self.formatTime(record)
        return f"{asctime} {record.levelname} {where}: {message}{suffix}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger, message, request_id,
    process, pid; an access line's parts as fields; an exception's traceback as `exception`."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _time(self, record: logging.LogRecord) -> str:
        """ISO 8601 in UTC to the millisecond, `2024-05-01T12:00:00.123+00:00`; the part to the second formatted
        once a second."""
        second = int(record.created)
        if second != self._second:
            self._second_text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[: -len("+00:00")]
            self._second = second
        return f"{self._second_text}.{int(record.msecs):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "process": getattr(record, "role", None) or "server",
            "pid": record.process,
        }
        if record.name == ACCESS_LOGGER and isinstance(record.args, tuple) and len(record.args) == 5:
            entry.update(zip(ACCESS_FIELDS, record.args, strict=True))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class QueuedStderrHandler(logging.StreamHandler):
    """stderr, written from a daemon thread every `FLUSH_INTERVAL_S` (module docstring); WARNING and above, and
    whatever is queued then, at once; `flush()` (logging.shutdown at exit) writes what is queued."""

    def __init__(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        super().__init__()  # stderr
        self.interval_s = interval_s
        self._queued: list[str] = []
        self._wake = threading.Event()  # set when a line is queued into an empty queue
        self._closed = False
        threading.Thread(target=self._write_queued, name="vitserve-log-writer", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held (Handler.handle)
        try:
            line = self.format(record)
        except RecursionError:  # as logging.StreamHandler.emit: see CPython issue 36272
            raise
        except Exception:
            self.handleError(record)
            return
        queued = self._queued
        queued.append(line)
        if record.levelno >= logging.WARNING or self._closed:
            self.flush()
        elif len(queued) == 1:
            self._wake.set()

    def flush(self) -> None:
        """Write every queued line now, in order, in pieces of whole lines that a pipe keeps whole."""
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            lines, self._queued = self._queued, []
            if not lines:
                return
            try:
                piece: list[str] = []
                size = 0
                for line in lines:
                    n = (len(line) if line.isascii() else len(line.encode("utf-8", "replace"))) + 1
                    if piece and size + n > _ATOMIC_WRITE:
                        self._write(piece)
                        piece, size = [], 0
                    piece.append(line)
                    size += n
                self._write(piece)
            except Exception:  # stderr gone: as logging.Handler.handleError, the lines are dropped, said if it can
                if logging.raiseExceptions:
                    with contextlib.suppress(OSError, ValueError):
                        traceback.print_exc()

    def _write(self, lines: list[str]) -> None:
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._closed = True  # anything logged from now on is written at once
        self.flush()
        self._wake.set()
        super().close()

    def _write_queued(self) -> None:
        while not self._closed:
            self._wake.wait()
            time.sleep(self.interval_s)  # let lines gather: one write for all of them
            self._wake.clear()  # before flush: a line queued after this sets it again
            self.flush()


def setup_logging(settings: Settings, role: str | None = None) -> None:
    """Configure the root logger of this process; `role` names it in each line ("engine", "worker 2", ...)."""
    # What no formatter here prints, so no record needs to find it (logging's HOWTO, "Optimization"): the
    # caller's file and line (a walk up the stack per record), the thread, the multiprocessing process name.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = QueuedStderrHandler()
    handler.addFilter(RequestIdFilter(role))  # on the handler: it sees records of every logger, uvicorn's too
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        root.removeHandler(old)
        if isinstance(old, QueuedStderrHandler):
            old.close()  # writes what it queued, stops its thread
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


def worker_role(index: int | None) -> str:
    """An HTTP worker's role, by the index the supervisor gave it."""
    return f"worker {'?' if index is None else index}"
