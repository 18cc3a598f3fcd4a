"""Logging for the gateway: a request id travels in a contextvar and lands on every record."""

from __future__ import annotations

import contextvars
import logging
import uuid
from dataclasses import dataclass, field

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


@dataclass
class RequestContext:
    """Per-RPC state shared by the interceptor and the servicer (same asyncio task)."""

    request_id: str
    rpc: str
    labels: dict[str, str] = field(default_factory=dict)


current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "vqs_request", default=None
)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def request_id() -> str:
    ctx = current_request.get()
    return ctx.request_id if ctx else "-"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id()
        return True


def configure(level: str = "INFO") -> None:
    """Call once, at an entry point."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and tritonclient are chatty at DEBUG.
    for name in ("grpc", "urllib3"):
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
