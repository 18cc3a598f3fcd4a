"""`vqs.v1.VideoAnalytics`: proto -> domain, the pipeline, domain -> proto. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from server.api import mapping
from server.api.sources import resolve_uri
from server.errors import BackendUnavailable, InvalidInput, Overloaded, Timeout, TooLarge, echo
from server.logs import current_request, request_id
from server.pipeline.analyze import Analyzer, AnalyzeJob
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.settings import Settings

logger = logging.getLogger(__name__)


def validate_encoder_name(encoder: str, default: str) -> str:
    """The requested encoder's name (the default when empty); letters, digits and `_` only."""
    name = encoder.strip() or default
    if not name.replace("_", "").isalnum():
        raise InvalidInput(f"invalid encoder name {echo(name)}")
    return name


class Slots:
    """At most `limit` requests at once; one more is refused, not queued."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def claim(self):
        if self.used >= self.limit:
            raise Overloaded(
                f"server busy: {self.limit} requests already running "
                f"(limits.max_concurrent_requests); retry later"
            )
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


class VideoAnalyticsServicer(pb_grpc.VideoAnalyticsServicer):
    def __init__(
        self,
        settings: Settings,
        analyzer: Analyzer,
        *,
        unavailable: Callable[[], str | None] = lambda: None,
    ):
        """`unavailable()` says why Triton cannot serve right now (None when it can)."""
        self.settings = settings
        self.analyzer = analyzer
        self.slots = Slots(settings.limits.max_concurrent_requests)
        self.unavailable = unavailable

    def _require_backend(self) -> None:
        # Refuse at once rather than decode a video Triton cannot encode.
        reason = self.unavailable()
        if reason:
            raise BackendUnavailable(f"{reason}; retry later")

    def _source(self, request: pb.AnalyzeRequest) -> bytes | Path:
        limit = self.settings.limits.max_upload_bytes
        which = request.WhichOneof("source")
        if which == "video":
            video = request.video  # read once: each read of a bytes field copies it
            if not video:
                raise InvalidInput("the uploaded video is empty (0 bytes)")
            if len(video) > limit:
                raise TooLarge(
                    f"upload is {len(video)} bytes; the limit is {limit} bytes "
                    f"(limits.max_upload_bytes)"
                )
            return video
        if which == "uri":
            return resolve_uri(request.uri, self.settings.security.allowed_root, max_bytes=limit)
        raise InvalidInput("set either `video` (the file's bytes) or `uri` (a server path)")

    async def Analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext):
        self._require_backend()
        encoder = validate_encoder_name(request.encoder, self.settings.default_encoder)
        await self.analyzer.encoder(encoder)  # unknown names never become metric labels
        ctx = current_request.get()
        if ctx is not None:
            ctx.labels["encoder"] = encoder
        source = self._source(request)
        deadline = self.settings.limits.request_deadline_s
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline, remaining)
        with self.slots.claim():
            try:
                async with asyncio.timeout(deadline) as timer:
                    result = await self.analyzer.analyze(AnalyzeJob(source=source, encoder=encoder))
            except TimeoutError:
                if timer.expired():
                    raise Timeout(f"analysis did not finish within its {deadline:.0f} s deadline") from None
                raise
        logger.info(
            "analyzed %d clips (%.1f s of video) with %s in %.0f ms",
            result.clips, result.video.duration_s, encoder, result.timing_ms.get("total", 0.0),
        )
        return mapping.analyze_response(result, request_id())

    async def DescribeModels(self, request, context: grpc.aio.ServicerContext):
        self._require_backend()
        models = await self.analyzer.models()
        return mapping.describe_response(
            models,
            default_encoder=self.settings.default_encoder,
            max_upload_bytes=self.settings.limits.max_upload_bytes,
            max_duration_s=self.settings.limits.max_duration_s,
        )
