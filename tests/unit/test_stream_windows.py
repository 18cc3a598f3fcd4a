"""`StreamAnalyzer`'s windows, resume, in-band and fatal errors, with a fake decoder and Triton (the
real ones are in tests/integration/test_stream.py): which clips each window holds, what reaches
the query decoder, and when a stream ends."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import numpy as np
import pytest

from server.errors import BackendUnavailable, InvalidInput, UnsupportedMedia
from server.pipeline.assemble import AnalysisResult
from server.pipeline.decode import ClipBatch, VideoInfo
from server.pipeline.stream import (
    EventKind,
    ResumeToken,
    StreamAnalyzer,
    StreamLimits,
    StreamOptions,
)
from server.triton import EncodedClips, EncoderSpec

SPEC = EncoderSpec(encoder="s3d", model="clip_encoder_s3d", clip_frames=2, frame_size=4,
                   feature_dim=256, max_batch_size=8, clip_fps=15.0)
BYTES_PER_CLIP = 100
CLIP_S = 0.5


class FakeTriton:
    def __init__(self, failing: set[int] = frozenset()):
        self.failing = failing
        self.encoded: list[int] = []
        self.budgets: list[float] = []

    async def frame_model(self, name: str):
        return None  # serves no per-frame models: streams get no segments

    async def model_index(self):
        return [{"name": "clip_encoder_s3d", "version": "1", "state": "READY"},
                {"name": "tqn_decoder", "version": "2", "state": "READY"}]

    async def encode(self, clips: np.ndarray, *, encoder: str, budget: float) -> EncodedClips:
        indices = [int(c[0, 0, 0, 0]) for c in clips]
        if self.failing & set(indices):
            raise BackendUnavailable("Triton is restarting")
        self.encoded += indices
        self.budgets.append(budget)
        features = np.stack([np.full(256, i, np.float32) for i in indices])
        distances = np.array(indices, np.float64) + 1.0  # clip i's domain_distance: i + 1
        return EncodedClips(features, None, np.full(len(indices), 0.5), distances)


class FakeDecoder:
    """Reads the whole pipe (or file), then yields one clip per BYTES_PER_CLIP bytes; clip i's
    pixels are i and it spans [i, i + 1) x CLIP_S."""

    def __init__(self, skipped: frozenset[int] = frozenset()):
        self.live: list[bool] = []
        self.max_lag_s: list[float | None] = []
        self.skipped = skipped  # clips the decoder marks dropped when asked to keep up (max_lag_s)

    async def stream(self, source: Path, *, frame_size, clip_frames, sample_fps, clips_per_batch,
                     live=False, chunk_frames=None, max_lag_s=None):
        self.live.append(live)
        self.max_lag_s.append(max_lag_s)
        data = await asyncio.to_thread(Path(source).read_bytes)
        info = VideoInfo(fps=15.0, width=4, height=4, frames=0, duration_s=0.0)
        for i in range(len(data) // BYTES_PER_CLIP):
            clip = np.full((1, clip_frames, frame_size, frame_size, 3), i, np.uint8)
            dropped = np.array([max_lag_s is not None and i in self.skipped])
            yield ClipBatch(clip, np.array([[i * CLIP_S, (i + 1) * CLIP_S]]), info, dropped)


class FakeAnalyzer:
    def __init__(self, triton: FakeTriton):
        self.triton = triton
        self.video_decoder = FakeDecoder()
        self.observer = None
        self.answered: list[list[int]] = []  # the clips (by feature value) of each answer
        self.computes: list = []  # the compute record each answer was given
        self.distances: list = []  # the clips' domain_distance each answer was given

    async def encoder(self, name: str) -> EncoderSpec:
        return SPEC

    async def answer(self, spec, clip_features, spans_s, video, timing_ms, *, compute=None,
                     domain_distance=None) -> AnalysisResult:
        self.answered.append([int(f[0]) for f in clip_features])
        self.computes.append(compute)
        self.distances.append(domain_distance)
        return AnalysisResult(encoder="s3d", video=video, clips=len(spans_s), answers=[],
                              attention=[], timing_ms=dict(timing_ms), compute=compute)


def limits(**changes) -> StreamLimits:
    base = dict(idle_s=5.0, max_chunk_bytes=1 << 20, max_bytes_per_s=1 << 30, window_clips=4,
                max_window_clips=64, pending_clips=64, max_spill_bytes=1 << 20, encode_inflight=2,
                clips_per_batch=4, max_lag_s=0.5)
    return StreamLimits(**(base | changes))


async def run(tmp_path, data: bytes, *, triton=None, skipped=frozenset(), stream_limits=None, **options):
    analyzer = FakeAnalyzer(triton or FakeTriton())
    analyzer.video_decoder.skipped = skipped
    streams = StreamAnalyzer(analyzer, stream_limits or limits(), workdir=tmp_path)
    opts = StreamOptions(encoder="s3d", **({"window_clips": 4, "hop_clips": 2, "mode": "archive"} | options))

    async def chunks():
        for i in range(0, len(data), 64):
            yield data[i:i + 64]

    events = [e async for e in streams.run(opts, chunks())]
    return events, analyzer


def spans_of(events, kind=EventKind.WINDOW):
    return [(e.first_clip, e.last_clip) for e in events if e.kind is kind]


async def test_windows_hop_over_the_clips_and_the_last_one_is_shorter(tmp_path):
    events, analyzer = await run(tmp_path, b"\x47" * (7 * BYTES_PER_CLIP))
    assert spans_of(events) == [(0, 3), (2, 5), (4, 6)]
    windows = [e for e in events if e.kind is EventKind.WINDOW]
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 2.0), (1.0, 3.0), (2.0, 3.5)]
    assert analyzer.answered == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6], list(range(7))]
    final = events[-1]
    assert final.kind is EventKind.FINAL and (final.first_clip, final.last_clip) == (0, 6)
    assert final.model_version == "clip_encoder_s3d:1,tqn_decoder:2"
    assert ResumeToken.parse(final.resume_token) == ResumeToken(6, 3.5)
    assert analyzer.video_decoder.live == [True]  # not MP4: decoded from the pipe as it came


async def test_a_resumed_stream_skips_the_windows_its_token_covers(tmp_path):
    token = ResumeToken(3, 2.0)
    events, _ = await run(tmp_path, b"\x47" * (7 * BYTES_PER_CLIP), resume=token)
    assert spans_of(events) == [(2, 5), (4, 6)]
    with pytest.raises(Exception, match="does not fit this stream"):
        await run(tmp_path, b"\x47" * (7 * BYTES_PER_CLIP), resume=ResumeToken(3, 9.0))


async def test_a_failed_encoder_request_is_an_in_band_error_of_its_windows(tmp_path):
    # Clips are encoded 4 at a time at most: fail the batch holding clip 5 only.
    triton = FakeTriton(failing={5})
    events, analyzer = await run(tmp_path, b"\x47" * (12 * BYTES_PER_CLIP), triton=triton,
                                 window_clips=2, hop_clips=2)
    windows = [e for e in events if e.kind is EventKind.WINDOW]
    failed = [w for w in windows if w.error]
    assert failed and all("UNAVAILABLE" in w.error for w in failed)
    assert all(w.first_clip <= 5 + 4 and w.last_clip >= 5 - 4 for w in failed)
    assert events[-1].kind is EventKind.FINAL  # the stream went on
    assert 5 not in analyzer.answered[-1]  # the final answer is over the clips that were encoded


async def test_windows_failing_in_a_row_end_the_stream_with_their_error(tmp_path):
    triton = FakeTriton(failing=set(range(100)))
    with pytest.raises(BackendUnavailable, match="last 3 windows failed"):
        await run(tmp_path, b"\x47" * (12 * BYTES_PER_CLIP), triton=triton, window_clips=2, hop_clips=2)


class BrokenDecoder(FakeDecoder):
    def stream(self, source: Path, **options):  # fails when called, before it yields anything
        raise RuntimeError("the decode pool is gone")


async def test_a_decoder_that_fails_when_called_ends_the_stream_with_its_error(tmp_path):
    analyzer = FakeAnalyzer(FakeTriton())
    analyzer.video_decoder = BrokenDecoder()
    streams = StreamAnalyzer(analyzer, limits(), workdir=tmp_path)

    async def chunks():
        yield b"\x47" * BYTES_PER_CLIP

    events = []
    with pytest.raises(RuntimeError, match="decode pool is gone"):
        async with asyncio.timeout(30):  # not a stream that waits forever for clips
            async for event in streams.run(StreamOptions(encoder="s3d", window_clips=4, hop_clips=2), chunks()):
                events.append(event)
    assert all(e.kind is not EventKind.FINAL for e in events)


async def test_an_empty_stream_is_refused(tmp_path):
    with pytest.raises(UnsupportedMedia, match="before any video bytes"):
        await run(tmp_path, b"")


async def test_an_mp4_with_its_index_at_the_end_is_spilled_then_decoded_as_a_file(tmp_path):
    mp4 = struct.pack(">I4s", 16, b"ftyp") + b"isom" * 2 + struct.pack(">I4s", 8 + 600, b"mdat") + b"\0" * 600
    events, analyzer = await run(tmp_path, mp4)
    notes = [e.note for e in events if e.kind is EventKind.PROGRESS and e.note]
    assert len(notes) == 1 and "frag_keyframe+empty_moov" in notes[0]
    assert analyzer.video_decoder.live == [False]
    assert events[-1].kind is EventKind.FINAL and events[-1].clips_decoded == len(mp4) // BYTES_PER_CLIP
    assert not list(tmp_path.iterdir())  # the spill file and pipe directories are gone


async def test_realtime_mode_drops_the_oldest_waiting_clips(tmp_path):
    analyzer = FakeAnalyzer(FakeTriton())
    gate = asyncio.Event()
    encode = analyzer.triton.encode

    async def slow_encode(clips, *, encoder, budget):  # the encoder is stuck until every clip is decoded
        await gate.wait()
        return await encode(clips, encoder=encoder, budget=budget)

    analyzer.triton.encode = slow_encode
    streams = StreamAnalyzer(analyzer, limits(pending_clips=2, encode_inflight=1, clips_per_batch=1),
                             workdir=tmp_path)

    async def chunks():
        yield b"\x47" * (10 * BYTES_PER_CLIP)

    async def release():
        await asyncio.sleep(0.5)
        gate.set()

    releasing = asyncio.create_task(release())
    options = StreamOptions(encoder="s3d", window_clips=10, hop_clips=10, mode="realtime")
    events = [e async for e in streams.run(options, chunks())]
    await releasing
    final = events[-1]
    # At most one clip in the encoder and 2 waiting: the others were dropped, oldest first, so
    # the newest two were analysed.
    assert final.dropped_clips_total >= 7
    assert final.clips_analysed + final.dropped_clips_total == final.clips_decoded == 10
    assert {8, 9} <= set(analyzer.triton.encoded)
    (window,) = [e for e in events if e.kind is EventKind.WINDOW]
    assert window.dropped_clips == final.dropped_clips_total


async def test_clips_the_decoder_skipped_are_dropped_in_their_place_in_realtime_mode(tmp_path):
    """Realtime mode asks the decoder to keep up (max_lag_s); the clips it marks dropped keep
    their index and span, are never encoded, and are counted per window and in the total.
    Archive mode does not ask."""
    data = b"\x47" * (8 * BYTES_PER_CLIP)
    # (A bound long enough that the clips the fake decoder yields at once all wait for the encoder.)
    events, analyzer = await run(tmp_path, data, skipped=frozenset({2, 3, 4}), mode="realtime",
                                 window_clips=4, hop_clips=4, stream_limits=limits(max_lag_s=100.0))
    assert analyzer.video_decoder.max_lag_s == [100.0]
    assert sorted(analyzer.triton.encoded) == [0, 1, 5, 6, 7]
    assert spans_of(events) == [(0, 3), (4, 7)]
    windows = [e for e in events if e.kind is EventKind.WINDOW]
    assert [w.dropped_clips for w in windows] == [2, 1]
    assert analyzer.answered[:2] == [[0, 1], [5, 6, 7]]
    final = events[-1]
    assert final.dropped_clips_total == 3 and final.clips_decoded == 8 and final.clips_analysed == 5
    assert (final.start_s, final.end_s) == (0.0, 8 * CLIP_S)

    events, analyzer = await run(tmp_path, data, skipped=frozenset({2, 3, 4}), mode="archive")
    assert analyzer.video_decoder.max_lag_s == [None]
    assert events[-1].dropped_clips_total == 0 and sorted(analyzer.triton.encoded) == list(range(8))


async def test_the_budget_goes_to_the_encoder_and_each_answer_says_what_its_clips_cost(tmp_path):
    """A fixed-compute encoder runs at budget 1; every window's and the final answer's compute
    record covers exactly its own clips (here 0.5 GMACs each)."""
    events, analyzer = await run(tmp_path, b"\x47" * (6 * BYTES_PER_CLIP), window_clips=4, hop_clips=2)
    assert set(analyzer.triton.budgets) == {1.0}
    assert [len(c.gmacs) for c in analyzer.computes] == [len(a) for a in analyzer.answered]
    assert all(c.budget == 1.0 and np.allclose(c.gmacs, 0.5) for c in analyzer.computes)
    with pytest.raises(InvalidInput, match="no adaptive module"):
        await run(tmp_path, b"\x47" * BYTES_PER_CLIP, budget=0.5)


async def test_each_answer_gets_the_domain_distances_of_its_own_clips(tmp_path):
    events, analyzer = await run(tmp_path, b"\x47" * (7 * BYTES_PER_CLIP), window_clips=4, hop_clips=2)
    assert len(analyzer.answered) == 4  # three windows and the final answer
    assert [d.tolist() for d in analyzer.distances] == [[i + 1.0 for i in a] for a in analyzer.answered]


async def test_realtime_mode_drops_waiting_clips_the_newest_is_more_than_the_bound_ahead_of(tmp_path):
    """An encoder stuck while ten clips of 0.5 s arrive: with a 1.2 s bound only the clips ending
    within 1.2 s of the newest still wait (the queue's length alone would keep 8)."""
    analyzer = FakeAnalyzer(FakeTriton())
    gate = asyncio.Event()
    encode = analyzer.triton.encode

    async def stuck_encode(clips, *, encoder, budget):
        await gate.wait()
        return await encode(clips, encoder=encoder, budget=budget)

    analyzer.triton.encode = stuck_encode
    streams = StreamAnalyzer(analyzer, limits(pending_clips=8, encode_inflight=1, clips_per_batch=1,
                                              max_lag_s=1.2), workdir=tmp_path)

    async def chunks():
        yield b"\x47" * (10 * BYTES_PER_CLIP)
        gate.set()

    options = StreamOptions(encoder="s3d", window_clips=10, hop_clips=10, mode="realtime")
    events = [e async for e in streams.run(options, chunks())]
    # Besides a clip the encoder may have taken at once, those ending 1.2 s or less before clip 9.
    encoded = set(analyzer.triton.encoded)
    assert {7, 8, 9} <= encoded <= {0, 7, 8, 9}
    assert events[-1].dropped_clips_total == 10 - len(encoded)
