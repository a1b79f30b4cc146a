"""Logging, configured once by the command line; modules only call ``logging.getLogger``."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

import orjson

# The request being answered, set by the middleware: every log line written while answering it says so.
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class _AccessQueryFilter(logging.Filter):
    """uvicorn's access line shows the query string, and clients do put keys (``?api_key=``) and signed
    URLs there: the line keeps the path and says only that a query was sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            target = record.args[2]
            if isinstance(target, str) and "?" in target:
                record.args = (*record.args[:2], target.split("?", 1)[0] + "?...", *record.args[3:])
        return True


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if self._worker is not None:
            data["worker"] = self._worker
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


def configure_logging(level: str = "info", fmt: str = "text", *, worker: int | None = None) -> None:
    """``worker``: this process is worker N of several (server.workers); its lines say so."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(worker))
    else:
        tag = "" if worker is None else f"w{worker} "
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(name)s [%(request_id)s]: %(message)s")
        )
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(_AccessQueryFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours; its access log stays off unless asked for.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
