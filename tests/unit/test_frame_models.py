"""The gateway's side of the per-frame models (issue 11): their Triton contract and config, frames
pooled and windowed, the parser's outputs decoded into segments (pure functions, no server)."""

from __future__ import annotations

import timeit

import numpy as np
import pytest

from server import triton
from server.pipeline import segments as seg


def parser_config(**parameters) -> dict:
    params = {"fps": "15", "context_frames": "16", "boundary_threshold": "0.5", "max_boundaries": "0",
              "patterns": "8"} | parameters
    return {
        "name": triton.PARSER_MODEL,
        "input": [{"name": "frames", "data_type": "TYPE_UINT8", "dims": ["1", "-1", "28", "28", "3"]}],
        "output": [{"name": "responses"}, {"name": "boundary_scores"}],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }


def test_frame_model_spec_reads_the_config():
    spec = triton.frame_model_spec(parser_config(max_boundaries="6", min_frames="8"))
    assert spec == triton.FrameModelSpec(
        model="action_parser", frame_size=28, fps=15.0, context_frames=16,
        outputs=("responses", "boundary_scores"), min_frames=8, boundary_threshold=0.5, max_boundaries=6)
    assert triton.frame_model_spec(parser_config()).min_frames == 1
    assert triton.contract_for("action_parser", parser_config()).outputs[0].dims == (1, -1, 8)
    embedder = {"name": "frame_embedder", "output": [{"name": "embeddings"}, {"name": "frame_features"}]}
    assert [t.name for t in triton.contract_for("frame_embedder", embedder).outputs] == ["embeddings", "frame_features"]
    assert [t.name for t in triton.contract_for("frame_embedder", embedder | {"output": []}).outputs] == ["embeddings"]


@pytest.mark.parametrize("missing", ["fps", "context_frames", "boundary_threshold"])
def test_frame_model_spec_names_a_missing_parameter(missing):
    config = parser_config()
    del config["parameters"][missing]
    with pytest.raises(ValueError, match="re-export"):
        triton.frame_model_spec(config)


def contract_pool(frames: np.ndarray, size: int) -> np.ndarray:
    """The rounded mean of each block, written as the contract says it."""
    n, side, _, channels = frames.shape
    k = side // size
    blocks = frames.reshape(n, size, k, size, k, channels).astype(np.uint16).sum((2, 4))
    return ((blocks + k * k // 2) // (k * k)).astype(np.uint8)


@pytest.mark.parametrize("shape, size", [((5, 112, 112, 3), 28), ((2, 112, 112, 3), 56), ((1, 112, 112, 3), 7)])
def test_pool_frames_is_the_rounded_block_mean_of_the_contract(shape, size):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(seg.pool_frames(frames, size), contract_pool(frames, size))
    white = np.full(shape, 255, np.uint8)  # the largest sums (16 x 16 x 255 at 7 px) fit
    np.testing.assert_array_equal(seg.pool_frames(white, size), white[:, :size, :size])
    with pytest.raises(ValueError):
        seg.pool_frames(frames[:, :100, :100], 28)


def test_pooling_a_clip_is_far_cheaper_than_the_contracts_sum_over_both_block_axes():
    """A stream's every clip is pooled on the gateway's event loop. numpy's sum over the two block
    axes at once took ~10 ms a clip (8 frames of 112 px) under load: a third of the loop's time
    with 16 streams, which fell 10-20 s behind real time (README, Streaming). Summed a block row
    and a block column at a time it is 15-20x cheaper; a quarter leaves room for noise."""
    frames = np.random.default_rng(1).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)

    def best(pool) -> float:
        return min(timeit.repeat(lambda: pool(frames, 28), number=5, repeat=7))

    assert best(seg.pool_frames) < best(contract_pool) / 4


def test_frame_times_drop_the_final_clips_padding():
    fps = 15.0
    # Two full clips and a final one holding 3 real frames (its span ends with the third).
    spans = np.array([[0.0, 8 / fps], [8 / fps, 16 / fps], [16 / fps, 19 / fps]])
    starts, real = seg.frame_times(spans, 8, fps)
    assert real.sum() == 19 and real[2].tolist() == [True] * 3 + [False] * 5
    np.testing.assert_allclose(starts[real], np.arange(19) / fps)


@pytest.mark.parametrize("total,window,context,push", [(1, 4, 2, 1), (50, 8, 3, 7), (64, 16, 0, 64), (37, 5, 9, 3)])
def test_windows_give_what_the_whole_video_gives(total, window, context, push):
    """A model whose output at t depends on frames t-context..t+context: the kept centres of the
    windows, concatenated, equal the model on the whole video."""
    video = np.arange(total, dtype=np.int64)

    def local_sum(x):  # the receptive field is exactly +-context
        padded = np.pad(x.astype(np.float64), context, constant_values=np.nan)
        return np.array([np.nansum(padded[i:i + 2 * context + 1]) for i in range(len(x))])

    windows = seg.FrameWindows(window, context)
    kept = []
    for start in range(0, total, push):
        kept += [local_sum(w.frames)[w.keep] for w in windows.push(video[start:start + push])]
        assert all(len(w.frames) <= window + 2 * context for w in windows.push(video[:0]))
    kept += [local_sum(w.frames)[w.keep] for w in windows.flush()]
    np.testing.assert_array_equal(np.concatenate(kept), local_sum(video))
    assert len(windows._buffer) <= window + 2 * context + push


def test_decode_segments_cuts_at_the_scored_frames():
    t = 10
    scores = np.zeros(t)
    scores[[3, 7]] = [0.9, 0.6]
    responses = np.zeros((t, 3))
    responses[:3, 0], responses[3:7, 2], responses[7:, 1] = 0.8, 0.7, 0.6
    times = np.arange(t) / 10
    segments, boundaries = seg.decode_segments(scores, responses, times, 1.0, threshold=0.5)
    assert boundaries == pytest.approx([0.3, 0.7])
    assert [s.pattern for s in segments] == [0, 2, 1]
    np.testing.assert_allclose([(s.start_s, s.end_s) for s in segments], [(0.0, 0.3), (0.3, 0.7), (0.7, 1.0)])
    assert [s.confidence for s in segments] == pytest.approx([0.8, 0.7, 0.6])
    # At most one boundary: the higher score stays.
    _, top = seg.decode_segments(scores, responses, times, 1.0, threshold=0.5, max_boundaries=1)
    assert top == pytest.approx([0.3])
    # A frame 0 score never makes an empty first segment; nothing above threshold: one segment.
    scores[0] = 1.0
    assert len(seg.decode_segments(scores, responses, times, 1.0, threshold=0.95)[0]) == 1


def test_frame_results_travel_as_a_packed_tensor_and_come_back_in_the_json():
    from clients import timeline
    from clients.embeddings import tensor_array
    from server.api import mapping
    from server.proto import video_analytics_pb2 as pb

    rng = np.random.default_rng(1)
    values = rng.normal(size=(30, 128)).astype(np.float16)
    frames = seg.FrameResults(
        segments=[seg.Segment(0.0, 1.2, 3, 0.8), seg.Segment(1.2, 2.0, 1, 0.6)], boundaries_s=[1.2],
        embeddings=values, times_s=np.arange(30) / 15.0, fps=15.0, features=values[::-1].copy())
    response = pb.AnalyzeResponse()
    mapping.add_frame_results(response, frames)
    response = pb.AnalyzeResponse.FromString(response.SerializeToString())
    assert response.embeddings.values.dtype == "float16" and len(response.embeddings.values.data) == 30 * 128 * 2
    np.testing.assert_array_equal(tensor_array(response.embeddings.values), values)

    as_json = timeline.frames_dict(response)
    assert as_json["segments"] == [{"start_s": 0.0, "end_s": 1.2, "pattern": 3, "confidence": 0.8},
                                   {"start_s": 1.2, "end_s": 2.0, "pattern": 1, "confidence": 0.6}]
    assert as_json["boundaries_s"] == [1.2]
    np.testing.assert_array_equal(tensor_array(as_json["embeddings"]["values"]), values)
    np.testing.assert_allclose(tensor_array(as_json["embeddings"]["times_s"]), np.arange(30) / 15.0)
    assert isinstance(as_json["embeddings"]["values"]["data"], str)  # base64, not a list of numbers
    np.testing.assert_array_equal(tensor_array(response.embeddings.features), values[::-1])
    np.testing.assert_array_equal(tensor_array(as_json["embeddings"]["features"]), values[::-1])


def test_dtw_follows_a_time_warp():
    from clients import embeddings

    rng = np.random.default_rng(2)
    a = rng.normal(size=(40, 16))
    warp = np.sort(rng.integers(0, 40, 70))  # b repeats and skips a's frames, in order
    warp[0], warp[-1] = 0, 39
    b = a[warp] + rng.normal(scale=0.05, size=(70, 16))
    path = embeddings.dtw(1 - embeddings.similarity(a, b))
    assert path[0] == (0, 0) and path[-1] == (39, 69)
    assert all(0 <= i2 - i1 <= 1 and 0 <= j2 - j1 <= 1 for (i1, j1), (i2, j2) in zip(path, path[1:]))
    assert np.mean([warp[j] == i for i, j in path]) > 0.9
    with pytest.raises(ValueError):
        embeddings.dtw(np.zeros((0, 3)))


def test_nearest_frames_keep_one_per_neighbourhood():
    from clients import embeddings

    frames = np.eye(4)[[0, 1, 1, 1, 2, 3, 1]]  # frames 1-3 and 6 equal the query
    found = embeddings.nearest_frames(np.eye(4)[1], frames.astype(float), top=3, min_gap=3)
    assert [i for i, _ in found] == [1, 6] and [s for _, s in found] == pytest.approx([1.0, 1.0])
    assert [i for i, _ in embeddings.nearest_frames(np.eye(4)[1], frames.astype(float), top=2, min_gap=1)] == [1, 2]


class FakeFrameTriton:
    """Per-frame 'models' whose output at t is a function of frames t-2..t+2 (context 2)."""

    def __init__(self):
        self.calls: list[int] = []

    async def run_frame_model(self, spec, frames):
        self.calls.append(len(frames))
        level = frames.reshape(len(frames), -1).mean(axis=1) / 255.0  # T
        smooth = np.convolve(np.pad(level, 2, mode="edge"), np.ones(5) / 5, mode="valid")
        if spec.model == triton.PARSER_MODEL:
            responses = np.stack([smooth, 1 - smooth], axis=1).astype(np.float32)
            return {"responses": responses, "boundary_scores": (np.abs(np.gradient(smooth)) > 0.05).astype(np.float32)}
        out = {"embeddings": np.repeat(smooth[:, None], 128, axis=1).astype(np.float32)}
        if "frame_features" in spec.outputs:
            out["frame_features"] = np.repeat(level[:, None], 128, axis=1).astype(np.float32)
        return out


async def test_frame_run_feeds_windows_and_drops_the_final_clips_padding():
    fps, clip_frames = 15.0, 8
    n_frames = 8 * 9 + 3  # nine full clips and three frames of a last one
    level = np.where(np.arange(n_frames) < 40, 30, 220).astype(np.uint8)  # one change at frame 40
    frames = np.broadcast_to(level[:, None, None, None], (n_frames, 112, 112, 3)).copy()
    padded = np.concatenate([frames, np.repeat(frames[-1:], 5, axis=0)])
    clips = padded.reshape(10, clip_frames, 112, 112, 3)
    starts = np.arange(10) * clip_frames / fps
    spans = np.stack([starts, np.minimum(starts + clip_frames / fps, n_frames / fps)], axis=1)
    parser = triton.FrameModelSpec("action_parser", 28, fps, 2, ("responses", "boundary_scores"), 0.5, 0)
    embedder = triton.FrameModelSpec("frame_embedder", 28, fps, 2, ("embeddings", "frame_features"))
    fake = FakeFrameTriton()
    run = seg.FrameRun(fake, parser=parser, embedder=embedder, clip_frames=clip_frames, fps=fps,
                       window_frames=16, inflight=2)
    for batch in (slice(0, 4), slice(4, 8), slice(8, 10)):
        await run.add(clips[batch], spans[batch])
    result = await run.finish()

    assert len(result.times_s) == n_frames and result.embeddings.shape == (n_frames, 128)
    np.testing.assert_allclose(result.times_s, np.arange(n_frames) / fps)
    whole = await FakeFrameTriton().run_frame_model(embedder, seg.pool_frames(frames, 28))
    np.testing.assert_allclose(result.embeddings, whole["embeddings"], atol=1e-3)
    np.testing.assert_allclose(result.features, whole["frame_features"], atol=1e-3)
    assert result.segments[-1].end_s == pytest.approx(n_frames / fps)
    assert len(result.boundaries_s) >= 1 and all(37 / fps <= b <= 42 / fps for b in result.boundaries_s)
    assert max(fake.calls) <= 16 + 2 * 2  # windows, never the whole video


@pytest.mark.parametrize("seed", range(5))
def test_the_gateways_decoding_is_the_exports(seed):
    """server/ may not import export/: the gateway's decoding is its own copy, held to the
    reference the parser was evaluated with."""
    from export.models.parser import decode_segments as reference

    rng = np.random.default_rng(seed)
    t, m = 120, 8
    scores = np.where(rng.random(t) < 0.1, rng.random(t), 0.0)
    responses = rng.random((t, m))
    for threshold, most in ((0.3, 0), (0.5, 3), (0.0, 1)):
        segments, boundaries = seg.decode_segments(scores, responses, np.arange(t) / 15.0, t / 15.0,
                                                   threshold=threshold, max_boundaries=most)
        expected, frames = reference(scores, responses, threshold, most)
        assert boundaries == pytest.approx((np.asarray(frames) / 15.0).tolist())
        assert [(s.pattern, round(s.start_s * 15), round(s.end_s * 15)) for s in segments] == \
            [(s.pattern, s.start, s.end) for s in expected]
        assert [s.confidence for s in segments] == pytest.approx([s.confidence for s in expected])


async def test_a_window_shorter_than_the_models_minimum_is_padded_and_cut_back():
    fake = FakeFrameTriton()
    spec = triton.FrameModelSpec("frame_embedder", 28, 15.0, 2, ("embeddings",), min_frames=8)
    run = seg.FrameRun(fake, parser=None, embedder=spec, clip_frames=8, fps=15.0)
    clip = np.zeros((1, 8, 112, 112, 3), np.uint8)
    await run.add(clip, np.array([[0.0, 3 / 15.0]]))  # three real frames
    result = await run.finish()
    assert fake.calls == [8] and result.embeddings.shape == (3, 128)


async def test_frame_run_without_frames_finishes_empty():
    parser = triton.FrameModelSpec("action_parser", 28, 15.0, 2, ("responses", "boundary_scores"), 0.5, 0)
    run = seg.FrameRun(FakeFrameTriton(), parser=parser, embedder=None, clip_frames=8, fps=15.0)
    result = await run.finish()
    assert result.segments == [] and len(result.times_s) == 0


class ServedFrameModels:
    def __init__(self, **specs):
        self.specs = specs

    async def frame_model(self, model):
        return self.specs.get(model)


ENCODER = triton.EncoderSpec(encoder="s3d", model="clip_encoder_s3d", clip_frames=8, frame_size=112,
                             feature_dim=256, max_batch_size=64, clip_fps=15.0)
PARSER = triton.FrameModelSpec("action_parser", 28, 15.0, 11, ("responses", "boundary_scores"))
EMBEDDER = triton.FrameModelSpec("frame_embedder", 28, 15.0, 32, ("embeddings",))


async def test_frame_run_for_runs_what_is_asked_and_served():
    served = ServedFrameModels(action_parser=PARSER, frame_embedder=EMBEDDER)
    run = await seg.frame_run_for(served, ENCODER, segments=True, embeddings=False)
    assert run.parser is PARSER and run.embedder is None
    run = await seg.frame_run_for(served, ENCODER, segments=False, embeddings=True)
    assert run.parser is None and run.embedder is EMBEDDER
    assert not (await seg.frame_run_for(ServedFrameModels(), ENCODER, segments=True, embeddings=False)).active


async def test_embeddings_asked_of_a_server_that_cannot_give_them_are_invalid_input():
    from server.errors import InvalidInput

    with pytest.raises(InvalidInput, match="does not serve frame_embedder"):
        await seg.frame_run_for(ServedFrameModels(action_parser=PARSER), ENCODER, segments=True, embeddings=True)
    at_30 = ServedFrameModels(action_parser=PARSER, frame_embedder=EMBEDDER)
    encoder_30 = triton.EncoderSpec(**{**ENCODER.__dict__, "clip_fps": 30.0})
    with pytest.raises(InvalidInput, match="15 fps"):
        await seg.frame_run_for(at_30, encoder_30, segments=True, embeddings=True)
    # Segments are on by default: an encoder whose frames the parser cannot take just gets none.
    assert (await seg.frame_run_for(at_30, encoder_30, segments=True, embeddings=False)).parser is None


async def test_a_stream_ends_with_segments_unless_its_decoder_skipped_frames(tmp_path):
    """AnalyzeStream feeds every decoded clip to the parser: the final event carries the parse of
    all frames, the windows none; once the decoder skips frames (realtime, behind the feed) the
    parse would have holes, so that stream ends without one."""
    from tests.unit import test_stream_windows as streams

    class ParsingTriton(streams.FakeTriton):
        frames = FakeFrameTriton()

        async def frame_model(self, name):
            if name != triton.PARSER_MODEL:
                return None
            return triton.FrameModelSpec(name, streams.SPEC.frame_size, streams.SPEC.clip_fps, 2,
                                         ("responses", "boundary_scores"), 1, 0.5, 0)

        async def run_frame_model(self, spec, frames):
            return await self.frames.run_frame_model(spec, frames)

    data = b"\x47" * (6 * streams.BYTES_PER_CLIP)
    events, _ = await streams.run(tmp_path, data, triton=ParsingTriton(), window_clips=4, hop_clips=2)
    final = events[-1]
    assert final.result.frames is not None
    assert len(final.result.frames.times_s) == 6 * streams.SPEC.clip_frames and final.result.frames.segments
    assert all(e.result.frames is None for e in events[:-1] if e.result is not None)

    events, _ = await streams.run(tmp_path, data, triton=ParsingTriton(), skipped=frozenset({2}), mode="realtime",
                                  window_clips=4, hop_clips=2, stream_limits=streams.limits(max_lag_s=100.0))
    assert events[-1].result is not None and events[-1].result.frames is None
