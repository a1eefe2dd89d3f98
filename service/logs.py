"""Logging for every process of the server (one process; or supervisor, engine and HTTP workers): one handler on
stderr, text for people or JSON lines for log pipelines (`VITSERVE_LOG_FORMAT`), and the id of the request being
handled in every line logged while handling it.

The request id is a context variable that `service.middleware.RequestContextMiddleware` sets; uvicorn runs each
request in its own task, so the value belongs to that request and whatever it awaits. uvicorn's own loggers
(`uvicorn.error`, `uvicorn.access`) go through the same handler (`UVICORN_LOG_CONFIG`), so its access lines carry
the id too and, in JSON, their parts as fields.
"""

from __future__ import annotations

import json
import logging
import os
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

REQUEST_ID: ContextVar[str | None] = ContextVar("vitserve_request_id", default=None)
# uvicorn.Config(log_config=...): add no handlers of uvicorn's own, so its records reach the root handler here.
UVICORN_LOG_CONFIG: dict[str, Any] | None = None
# uvicorn's access record carries its parts as args, in this order (uvicorn.protocols.http.*_impl).
ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


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

    def format(self, record: logging.LogRecord) -> str:
        role = getattr(record, "role", None)
        record.where = f"{record.name}[{role}]" if role else record.name
        request_id = getattr(record, "request_id", None)
        record.request_suffix = f" [{request_id}]" if request_id else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger, message, request_id,
    process, pid; an access line's parts as fields; an exception's traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "process": getattr(record, "role", None) or "server",
            "pid": record.process,
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            entry.update(zip(ACCESS_FIELDS, record.args, strict=True))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(settings: Settings, role: str | None = None) -> None:
    """Configure the root logger of this process; `role` names it in each line ("engine", "worker 2", ...)."""
    handler = logging.StreamHandler()  # stderr
    handler.addFilter(RequestIdFilter(role))  # on the handler: it sees records of every logger, uvicorn's too
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


def worker_role() -> str:
    """An HTTP worker's role, by the index the supervisor gave it."""
    return f"worker {os.environ.get('VITSERVE_WORKER_INDEX', '?')}"
