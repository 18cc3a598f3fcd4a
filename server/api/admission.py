"""Admission: how many unary requests and how many streams run at once.

Each kind has its own limit (`limits.max_concurrent_requests`, `limits.max_concurrent_streams`),
so long streams cannot starve short requests nor the reverse. Beyond its limit a call is refused
at once with RESOURCE_EXHAUSTED naming the setting, never queued: a queue would hide overload
from clients, which retry or go elsewhere instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from server.errors import Overloaded
from server.settings import LimitsSettings


class Slots:
    """At most `limit` holders at once; one more is refused, not queued (0: every one is)."""

    def __init__(self, limit: int, *, what: str, setting: str):
        if limit < 0:
            raise ValueError(f"{setting} must be at least 0, got {limit}")
        self.limit = limit
        self.what = what
        self.setting = setting
        self.used = 0

    @contextlib.asynccontextmanager
    async def claim(self) -> AsyncIterator[None]:
        # No await between the check and the increment: on one event loop this is atomic.
        if self.limit == 0:
            raise Overloaded(f"{self.what} are turned off on this server ({self.setting} = 0)")
        if self.used >= self.limit:
            raise Overloaded(
                f"server busy: {self.limit} {self.what} already running ({self.setting}); retry later"
            )
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


class Admission:
    """`async with admission.unary():` around a unary request's work, `async with
    admission.stream():` around a whole stream (claimed before its first message is read)."""

    def __init__(self, limits: LimitsSettings):
        self.requests = Slots(
            limits.max_concurrent_requests, what="requests",
            setting="limits.max_concurrent_requests",
        )
        self.streams = Slots(
            limits.max_concurrent_streams, what="streams",
            setting="limits.max_concurrent_streams",
        )

    def unary(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.requests.claim()

    def stream(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.streams.claim()
