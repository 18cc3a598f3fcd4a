"""One video through the models: decode -> encode clip batches (several in flight) -> query decoder.

A bounded pipeline: at most `limits.encode_inflight` clip batches are held (being encoded) while the
video decoder keeps producing; only the [N, D] clip features and [N, 2] spans accumulate, so memory
does not grow with the video's length beyond D floats per clip.

Stage timings are the time the pipeline spent *waiting* on each stage, so they add up to about the
total: `decode` (waiting for the next clip batch from the video decoder), `encode` (waiting for
encoder results when the in-flight bound is reached, and at the end), `query_decoder` (the TQN
decoder model answering the queries).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from server.errors import InferenceFailed, UnsupportedMedia
from server.pipeline import assemble, segments
from server.pipeline.decode import ClipBatch, VideoInfo
from server.settings import LimitsSettings
from server.triton import EncodedClips, EncoderSpec, QuerySpec, TritonClient


class ClipSource(Protocol):
    """What the pipeline needs from `server.pipeline.decode.VideoDecoder`."""

    def stream(
        self, source: bytes | Path, *, frame_size: int, clip_frames: int,
        sample_fps: float | None, clips_per_batch: int,
    ) -> AsyncIterator[ClipBatch]: ...


class StageObserver(Protocol):
    def stage(self, stage: str, seconds: float) -> None: ...
    def video(self, clips: int, seconds: float) -> None: ...
    def compute(self, compute: assemble.Compute) -> None: ...


@dataclass(frozen=True)
class AnalyzeJob:
    source: bytes | Path
    encoder: str
    budget: float = 1.0  # share of the encoder's full compute, (0, 1]
    segments: bool = True  # the action parser's segments, when it is served
    embeddings: bool = False  # the frame embedder's per-frame embeddings


@dataclass(frozen=True)
class ModelCatalog:
    """The served models as the gateway describes them: the query decoder's queries (in its output
    order) and every ready encoder by name."""

    queries: tuple[QuerySpec, ...]
    encoders: dict[str, EncoderSpec]


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
        video_decoder: ClipSource,
        limits: LimitsSettings,
        *,
        observer: StageObserver | None = None,
    ):
        self.triton = triton
        self.video_decoder = video_decoder
        self.limits = limits
        self.observer = observer

    async def encoder(self, name: str) -> EncoderSpec:
        """The encoder called `name`; `InvalidInput` naming the available ones when none is."""
        return await self.triton.encoder_spec(name)

    async def models(self) -> ModelCatalog:
        """What Triton serves now (read afresh: models may have been reloaded)."""
        encoders = await self.triton.encoders(refresh=True)
        query_decoder = await self.triton.query_decoder(refresh=True)
        return ModelCatalog(queries=query_decoder.queries, encoders=encoders)

    async def analyze(self, job: AnalyzeJob) -> assemble.AnalysisResult:
        started = time.perf_counter()
        clock = _Clock()
        spec = await self.triton.encoder_spec(job.encoder)
        spec.check_budget(job.budget)
        frames = await segments.frame_run_for(
            self.triton, spec, segments=job.segments, embeddings=job.embeddings)

        encoded: list[EncodedClips] = []
        spans: list[np.ndarray] = []
        pending: deque[asyncio.Task] = deque()
        info = None
        stream = self.video_decoder.stream(
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
                        self.triton.encode(batch.clips, encoder=spec.encoder, budget=job.budget)
                    ))
                    spans.append(np.asarray(batch.spans_s, dtype=np.float64))
                    if frames.active:
                        with clock.waiting("frame_models"):
                            await frames.add(batch.clips, spans[-1])
                    del batch
                    while len(pending) >= self.limits.encode_inflight:
                        with clock.waiting("encode"):
                            encoded.append(await pending.popleft())
            with clock.waiting("encode"):
                while pending:
                    encoded.append(await pending.popleft())
            frame_results = None
            if frames.active:
                with clock.waiting("frame_models"):
                    frame_results = await frames.finish()
        finally:
            await frames.cancel()
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

        if not encoded:
            raise UnsupportedMedia("the video has no decodable frames")
        clips = EncodedClips.concatenate(encoded)
        clip_features = clips.features  # N, D
        spans_s = np.concatenate(spans)  # N, 2
        if len(spans_s) != len(clip_features):
            raise InferenceFailed(
                f"{len(clip_features)} clip features for {len(spans_s)} clip spans"
            )
        compute = assemble.compute(spec, job.budget, clips.kept, clips.gmacs)

        timing_ms = {k: v * 1000.0 for k, v in clock.spent.items()}
        result = await self.answer(spec, clip_features, spans_s, info, timing_ms, compute=compute,
                                   domain_distance=clips.domain_distance)
        total_s = time.perf_counter() - started
        if self.observer is not None:
            for stage, seconds in clock.spent.items():
                self.observer.stage(stage, seconds)
            self.observer.stage("query_decoder", result.timing_ms["query_decoder"] / 1000.0)
            self.observer.video(len(clip_features), info.duration_s)
            self.observer.compute(compute)
        return dataclasses.replace(
            result, timing_ms={**result.timing_ms, "total": total_s * 1000.0}, frames=frame_results)

    async def answer(
        self, spec: EncoderSpec, clip_features: np.ndarray, spans_s: np.ndarray, video: VideoInfo,
        timing_ms: dict[str, float], *, compute: assemble.Compute | None = None,
        domain_distance: np.ndarray | None = None,
    ) -> assemble.AnalysisResult:
        """The query decoder's answers about these clips (a whole video, or a window of a stream):
        answers, attention maps and, when it is known, whether they look like the training data
        (`assemble.judge_domain`; `domain_distance`: the encoder's, per clip); `compute` is what
        encoding them cost. `timing_ms` gains the decoder's own time as "query_decoder"."""
        decoder = await self.triton.query_decoder()
        started = time.perf_counter()
        outputs = await self.triton.run_query_decoder(clip_features)
        took_ms = (time.perf_counter() - started) * 1000.0
        domain = assemble.judge_domain(
            spec, distances=domain_distance,
            decoder_score=outputs.in_domain_score, decoder_threshold=decoder.in_domain_threshold)
        try:
            return assemble.build_result(
                encoder=spec.encoder,
                specs=decoder.queries,
                logits=outputs.logits,
                attention=outputs.attention,
                spans_s=spans_s,
                video=video,
                timing_ms={**timing_ms, "query_decoder": took_ms},
                domain=domain,
                compute=compute,
            )
        except ValueError as exc:
            raise InferenceFailed(
                f"the query decoder's outputs do not match its vocabulary: {exc}"
            ) from exc
