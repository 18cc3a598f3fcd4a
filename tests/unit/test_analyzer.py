"""`Analyzer` with fake collaborators: a fake clip source and a fake Triton."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from server.errors import InferenceFailed, InternalError, InvalidInput, UnsupportedMedia
from server.pipeline.analyze import AnalyzeJob, Analyzer
from server.pipeline.assemble import Domain
from server.pipeline.decode import ClipBatch, VideoInfo
from server.settings import LimitsSettings
from server.triton import DecoderOutputs, EncodedClips, EncoderSpec, QueryDecoderSpec, QuerySpec

FRAMES, SIZE, DIM = 2, 4, 3
QUERIES = (QuerySpec("take_off", ("forward", "back")), QuerySpec("class", ("a", "b", "c")))


class FakeTriton:
    """Encodes a clip as its mean pixel value; the query decoder favours the last attribute."""

    def __init__(self, *, encode_delay_s: float = 0.0, logits_width: int | None = None):
        self.spec = EncoderSpec("s3d", "clip_encoder_s3d", FRAMES, SIZE, DIM, 8, clip_fps=15.0)
        self.encode_delay_s = encode_delay_s
        self.logits_width = logits_width
        self.encoded = 0
        self.inflight = 0
        self.max_inflight = 0
        self.refreshed = 0

    async def encoder_spec(self, encoder: str) -> EncoderSpec:
        if encoder != "s3d":
            raise InvalidInput(f"unknown encoder {encoder!r}; available: s3d")
        return self.spec

    async def encoders(self, *, refresh: bool = False) -> dict[str, EncoderSpec]:
        self.refreshed += refresh
        return {"s3d": self.spec}

    async def query_decoder(self, *, refresh: bool = False) -> QueryDecoderSpec:
        return QueryDecoderSpec("tqn_decoder", QUERIES)

    async def encode_clips(self, clips: np.ndarray, *, encoder: str) -> np.ndarray:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(self.encode_delay_s)
        finally:
            self.inflight -= 1
        self.encoded += len(clips)
        return np.repeat(clips.reshape(len(clips), -1).mean(axis=1, keepdims=True), DIM, axis=1)

    async def encode(self, clips: np.ndarray, *, encoder: str, budget: float) -> EncodedClips:
        features = await self.encode_clips(clips, encoder=encoder)
        distances = features[:, 0] + 1.0 if self.spec.domain_scored else None  # a clip's: its pixel + 1
        return EncodedClips(features, None, np.full(len(features), 2.5), distances)

    async def frame_model(self, model: str):
        return None  # no per-frame models served

    async def run_query_decoder(self, features: np.ndarray):
        logits = {q.query: np.arange(self.logits_width or len(q.attributes), dtype=np.float32)
                  for q in QUERIES}
        attention = np.tile(np.linspace(1.0, 2.0, len(features)), (len(QUERIES), 1))
        return DecoderOutputs(logits, attention, None)


class FakeClips:
    """`batches` clip batches of `per_batch` clips, 1 s each."""

    def __init__(self, batches: int, per_batch: int = 2, *, empty_first: bool = False):
        self.batches = batches
        self.per_batch = per_batch
        self.empty_first = empty_first
        self.requested: dict = {}
        self.closed = False

    async def stream(self, source, *, frame_size, clip_frames, sample_fps, clips_per_batch):
        self.requested = dict(frame_size=frame_size, clip_frames=clip_frames,
                              sample_fps=sample_fps, clips_per_batch=clips_per_batch)
        clip = 0
        try:
            if self.empty_first:
                yield ClipBatch(np.zeros((0, clip_frames, frame_size, frame_size, 3), np.uint8),
                                np.zeros((0, 2)), _info(0))
            for _ in range(self.batches):
                n = self.per_batch
                clips = np.full((n, clip_frames, frame_size, frame_size, 3), clip, np.uint8)
                spans = np.array([[clip + i, clip + i + 1.0] for i in range(n)])
                clip += n
                yield ClipBatch(clips, spans, _info(clip))
        finally:
            self.closed = True


def _info(clips: int) -> VideoInfo:
    return VideoInfo(fps=15.0, width=32, height=24, frames=clips * FRAMES, duration_s=float(clips))


class Observer:
    def __init__(self):
        self.stages: dict[str, float] = {}
        self.videos: list[tuple[int, float]] = []
        self.computes: list = []

    def stage(self, stage: str, seconds: float) -> None:
        self.stages[stage] = seconds

    def video(self, clips: int, seconds: float) -> None:
        self.videos.append((clips, seconds))

    def compute(self, compute) -> None:
        self.computes.append(compute)


def analyzer(triton, clips, **limits) -> Analyzer:
    return Analyzer(triton, clips, LimitsSettings(**limits), observer=Observer())


async def test_a_video_goes_through_every_stage_in_order():
    triton, clips = FakeTriton(), FakeClips(batches=3)
    a = analyzer(triton, clips, clips_per_batch=2)
    result = await a.analyze(AnalyzeJob(source=b"video", encoder="s3d"))

    assert clips.requested == dict(frame_size=SIZE, clip_frames=FRAMES, sample_fps=15.0,
                                   clips_per_batch=2)
    assert clips.closed
    assert triton.encoded == 6 and result.clips == 6
    assert result.video == _info(6)
    assert [a.query for a in result.answers] == ["take_off", "class"]
    assert [a.attribute for a in result.answers] == ["back", "c"]
    assert [m.query for m in result.attention] == ["take_off", "class"]
    np.testing.assert_allclose(result.attention[0].spans_s[:, 0], np.arange(6))
    assert all(m.weights.sum() == pytest.approx(1.0) for m in result.attention)
    assert set(result.timing_ms) == {"decode", "encode", "query_decoder", "total"}
    assert set(a.observer.stages) == {"decode", "encode", "query_decoder"}
    assert a.observer.videos == [(6, 6.0)]


async def test_encoder_batches_in_flight_are_bounded():
    triton = FakeTriton(encode_delay_s=0.01)
    a = analyzer(triton, FakeClips(batches=10), encode_inflight=3)
    await a.analyze(AnalyzeJob(source=b"video", encoder="s3d"))
    assert 1 < triton.max_inflight <= 3


async def test_empty_batches_are_skipped_and_no_clips_is_unsupported_media():
    result = await analyzer(FakeTriton(), FakeClips(batches=1, empty_first=True)).analyze(
        AnalyzeJob(source=b"video", encoder="s3d"))
    assert result.clips == 2
    with pytest.raises(UnsupportedMedia, match="no decodable frames"):
        await analyzer(FakeTriton(), FakeClips(batches=0, empty_first=True)).analyze(
            AnalyzeJob(source=b"video", encoder="s3d"))


async def test_outputs_that_do_not_fit_the_vocabulary_are_the_servers_fault():
    a = analyzer(FakeTriton(logits_width=7), FakeClips(batches=1))
    with pytest.raises(InferenceFailed, match="vocabulary") as error:
        await a.analyze(AnalyzeJob(source=b"video", encoder="s3d"))
    assert isinstance(error.value, InternalError)  # INTERNAL, never INVALID_ARGUMENT


async def test_an_encoder_failure_cancels_the_batches_in_flight():
    class Failing(FakeTriton):
        async def encode_clips(self, clips, *, encoder):
            if self.encoded:
                raise InferenceFailed("encoder crashed")
            return await super().encode_clips(clips, encoder=encoder)

    triton, clips = Failing(encode_delay_s=0.01), FakeClips(batches=6)
    with pytest.raises(InferenceFailed, match="crashed"):
        await analyzer(triton, clips, encode_inflight=2).analyze(
            AnalyzeJob(source=b"video", encoder="s3d"))
    assert clips.closed and triton.inflight == 0


async def test_unknown_encoders_and_the_model_catalog():
    triton = FakeTriton()
    a = analyzer(triton, FakeClips(batches=1))
    with pytest.raises(InvalidInput, match="available: s3d"):
        await a.encoder("missing")
    models = await a.models()
    assert models.queries == QUERIES and list(models.encoders) == ["s3d"]
    assert triton.refreshed == 1  # DescribeModels reads Triton afresh


async def test_the_result_carries_what_the_encoder_spent():
    a = analyzer(FakeTriton(), FakeClips(batches=2))
    result = await a.analyze(AnalyzeJob(source=b"video", encoder="s3d"))
    assert result.compute.encoder == "s3d" and result.compute.budget == 1.0
    assert result.compute.kept_ratio == 1.0 and result.compute.adaptive is None
    assert result.compute.gmacs_per_clip == pytest.approx(2.5)
    assert a.observer.computes == [result.compute]


async def test_an_encoders_own_distances_judge_the_whole_video():
    """Clips 0-1 have pixels 0, clips 2-3 pixels 2: distances 1, 1, 3, 3 in two encoder batches."""
    triton = FakeTriton()
    triton.spec = dataclasses.replace(triton.spec, domain_scored=True, in_domain_threshold=-2.5)
    result = await analyzer(triton, FakeClips(batches=2)).analyze(AnalyzeJob(source=b"video", encoder="s3d"))
    assert result.domain == Domain(score=-2.0, threshold=-2.5, in_domain=True)


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, float("nan"), float("inf")])
async def test_a_budget_outside_its_range_is_refused_before_decoding(budget):
    clips = FakeClips(batches=1)
    with pytest.raises(InvalidInput, match=r"outside \(0, 1\]"):
        await analyzer(FakeTriton(), clips).analyze(AnalyzeJob(source=b"video", encoder="s3d", budget=budget))
    assert clips.requested == {}


async def test_a_fixed_compute_encoder_refuses_a_partial_budget():
    clips = FakeClips(batches=1)
    with pytest.raises(InvalidInput, match="no adaptive module"):
        await analyzer(FakeTriton(), clips).analyze(AnalyzeJob(source=b"video", encoder="s3d", budget=0.5))
    assert clips.requested == {}
