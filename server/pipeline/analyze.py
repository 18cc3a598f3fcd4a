"""One video through the models: decode -> encode clip batches (several in flight) -> decode queries.

A bounded pipeline: at most `encode_inflight` clip batches are held (being encoded) while the
decoder keeps producing; only the [N, D] clip features and [N, 2] spans accumulate, so memory does
not grow with the video's length beyond D floats per clip.

Stage timings are the time the pipeline spent *waiting* on each stage, so they add up to about the
total: `decode` (waiting for the next clip batch), `encode` (waiting for encoder results when the
in-flight bound is reached, and at the end), `decode_queries` (the decoder model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from server.errors import InferenceFailed, InvalidInput, UnsupportedMedia
from server.pipeline import assemble
from server.settings import LimitsSettings
from server.triton import QUERIES, TritonClient

logger = logging.getLogger(__name__)


class ClipSource(Protocol):
    """What the pipeline needs from `server.pipeline.decode.VideoDecoder`."""

    def stream(
        self, source: bytes | Path, *, frame_size: int, clip_frames: int, clips_per_batch: int
    ) -> AsyncIterator: ...


class StageObserver(Protocol):
    def stage(self, stage: str, seconds: float) -> None: ...
    def video(self, clips: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class AnalyzeJob:
    source: bytes | Path
    encoder: str


class _Clock:
    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    @contextlib.contextmanager
    def waiting(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spent[stage] = self.spent.get(stage, 0.0) + time.perf_counter() - start


class Analyzer:
    def __init__(
        self,
        triton: TritonClient,
        decoder: ClipSource,
        queries: Sequence[assemble.QuerySpec],
        limits: LimitsSettings,
        *,
        encode_inflight: int = 4,
        observer: StageObserver | None = None,
    ):
        if encode_inflight < 1:
            raise ValueError("encode_inflight must be >= 1")
        self.triton = triton
        self.decoder = decoder
        self.queries = list(queries)
        self.limits = limits
        self.encode_inflight = encode_inflight
        self.observer = observer

    async def analyze(self, job: AnalyzeJob) -> assemble.AnalysisResult:
        started = time.perf_counter()
        clock = _Clock()
        spec = await self.triton.encoder_spec(job.encoder)

        features: list[np.ndarray] = []
        spans: list[np.ndarray] = []
        pending: deque[asyncio.Task] = deque()
        info = None
        stream = self.decoder.stream(
            job.source,
            frame_size=spec.frame_size,
            clip_frames=spec.clip_frames,
            sample_fps=spec.clip_fps,
            clips_per_batch=self.limits.clips_per_batch,
        )
        try:
            async with contextlib.aclosing(stream) as batches:
                while True:
                    with clock.waiting("decode"):
                        batch = await anext(batches, None)
                    if batch is None:
                        break
                    info = batch.info
                    if len(batch.clips) == 0:
                        continue
                    pending.append(asyncio.create_task(
                        self.triton.encode_clips(batch.clips, encoder=spec.encoder)
                    ))
                    spans.append(np.asarray(batch.spans_s, dtype=np.float64))
                    del batch
                    while len(pending) >= self.encode_inflight:
                        with clock.waiting("encode"):
                            features.append(await pending.popleft())
            with clock.waiting("encode"):
                while pending:
                    features.append(await pending.popleft())
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

        if not features:
            raise UnsupportedMedia("the video has no decodable frames")
        clip_features = np.concatenate(features)  # N, D
        spans_s = np.concatenate(spans)  # N, 2
        if len(spans_s) != len(clip_features):
            raise InferenceFailed(
                f"{len(clip_features)} clip features for {len(spans_s)} clip spans"
            )

        with clock.waiting("decode_queries"):
            logits, attention = await self.triton.decode_queries(clip_features)

        video = assemble.VideoSummary(
            duration_s=info.duration_s,
            fps=info.fps,
            clips=len(clip_features),
            frames=info.frames,
            width=info.width,
            height=info.height,
        )
        clock.spent["total"] = time.perf_counter() - started
        if self.observer is not None:
            for stage, seconds in clock.spent.items():
                if stage != "total":
                    self.observer.stage(stage, seconds)
            self.observer.video(video.clips, video.duration_s)
        try:
            return assemble.build_result(
                encoder=spec.encoder,
                specs=self.queries,
                logits=logits,
                attention_order=QUERIES,
                attention=attention,
                spans_s=spans_s,
                video=video,
                timing_ms={k: v * 1000.0 for k, v in clock.spent.items()},
            )
        except ValueError as exc:
            raise InferenceFailed(f"model outputs do not match the decoder's model.json: {exc}") from exc


def validate_encoder_name(encoder: str, default: str) -> str:
    name = encoder.strip() or default
    if not name.replace("_", "").isalnum():
        raise InvalidInput(f"invalid encoder name {name!r}")
    return name
