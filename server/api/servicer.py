"""`vqs.v1.VideoAnalytics`: proto -> domain, the pipeline, domain -> proto. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from server.api import mapping
from server.api.admission import Admission
from server.api.sources import resolve_uri
from server.errors import BackendUnavailable, InvalidInput, Timeout, TooLarge, echo
from server.logs import current_request, request_id
from server.pipeline.analyze import Analyzer, AnalyzeJob
from server.pipeline.stream import StreamAnalyzer, StreamLimits
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


class VideoAnalyticsServicer(pb_grpc.VideoAnalyticsServicer):
    def __init__(
        self,
        settings: Settings,
        analyzer: Analyzer,
        *,
        unavailable: Callable[[], str | None] = lambda: None,
        stream_workdir: Path | None = None,
    ):
        """`unavailable()` says why Triton cannot serve right now (None when it can);
        `stream_workdir` holds the streams' pipes and spill files (default: the system's temp)."""
        self.settings = settings
        self.analyzer = analyzer
        self.admission = Admission(settings.limits)
        self.unavailable = unavailable
        self.streams = StreamAnalyzer(
            analyzer,
            StreamLimits.from_settings(settings.limits),
            workdir=stream_workdir or Path(tempfile.gettempdir()),
            observer=getattr(analyzer, "observer", None),
        )

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
        budget = mapping.budget(request.budget)
        # unknown names never become metric labels; a bad budget fails before any upload is read
        (await self.analyzer.encoder(encoder)).check_budget(budget)
        ctx = current_request.get()
        if ctx is not None:
            ctx.labels["encoder"] = encoder
        source = self._source(request)
        deadline = self.settings.limits.request_deadline_s
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline, remaining)
        async with self.admission.unary():
            try:
                async with asyncio.timeout(deadline) as timer:
                    result = await self.analyzer.analyze(
                        AnalyzeJob(source=source, encoder=encoder, budget=budget,
                                   segments=not request.omit_segments, embeddings=request.embeddings)
                    )
            except TimeoutError:
                if timer.expired():
                    raise Timeout(f"analysis did not finish within its {deadline:.0f} s deadline") from None
                raise
        logger.info(
            "analyzed %d clips (%.1f s of video) with %s in %.0f ms",
            result.clips, result.video.duration_s, encoder, result.timing_ms.get("total", 0.0),
        )
        return mapping.analyze_response(result, request_id())

    async def AnalyzeStream(self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext):
        async with self.admission.stream():
            self._require_backend()
            first = await self._first_message(requests)
            encoder = validate_encoder_name(first.encoder, self.settings.default_encoder)
            options = mapping.stream_options(first, encoder, self.streams.limits)
            await self.analyzer.encoder(options.encoder)  # unknown names never become metric labels
            ctx = current_request.get()
            if ctx is not None:
                ctx.labels["encoder"] = options.encoder
            events = 0
            # Written with context.write from this coroutine, not yielded: a cancelled call then
            # cancels this very task, so the stream's cleanup (its decode worker, its Triton
            # requests, its slot) runs at once instead of when an abandoned generator is collected.
            async with contextlib.aclosing(self.streams.run(options, _chunks(requests))) as stream:
                async for event in stream:
                    events += 1
                    await context.write(mapping.stream_event(event, request_id()))
            logger.info("stream ended after %d events", events)

    async def _first_message(self, requests: AsyncIterator[pb.StreamRequest]) -> pb.StreamOptions:
        idle = self.streams.limits.idle_s
        try:
            async with asyncio.timeout(idle):
                first = await anext(requests, None)
        except TimeoutError:
            raise Timeout(f"no StreamOptions within {idle:g} s (limits.stream_idle_s)") from None
        if first is None or first.WhichOneof("message") != "options":
            raise InvalidInput("the first message of a stream must be its StreamOptions")
        return first.options

    async def DescribeModels(self, request, context: grpc.aio.ServicerContext):
        self._require_backend()
        models = await self.analyzer.models()
        return mapping.describe_response(
            models,
            default_encoder=self.settings.default_encoder,
            max_upload_bytes=self.settings.limits.max_upload_bytes,
            max_duration_s=self.settings.limits.max_duration_s,
        )


async def _chunks(requests: AsyncIterator[pb.StreamRequest]) -> AsyncIterator[bytes]:
    """The video bytes of a stream's messages after its options."""
    async for message in requests:
        if message.WhichOneof("message") != "chunk":
            raise InvalidInput("StreamOptions may only be sent once, first; then only chunks")
        yield message.chunk
