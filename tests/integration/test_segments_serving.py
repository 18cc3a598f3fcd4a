"""Segments and frame embeddings through the real gateway, decoder and Triton (issue 11).

The gateway runs `action_parser` and `frame_embedder` in windows on the frames it decodes for the
clip encoder; here the same models are also asked directly, once, for a whole video decoded by the
test, and the two must agree. On generated videos whose truth is known, the served boundaries are
scored against the truth and against evenly spaced boundaries."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clients.embeddings import tensor_array
from server.pipeline.segments import decode_segments, pool_frames
from server.proto import video_analytics_pb2 as pb
from server.triton import frame_model_spec

pytestmark = pytest.mark.integration

FPS = 15.0


async def analyze(stub, data: bytes, **kwargs) -> pb.AnalyzeResponse:
    return await stub.Analyze(pb.AnalyzeRequest(video=data, **kwargs), timeout=180)


def render(seed: int, seconds: float) -> tuple[bytes, dict]:
    import tempfile
    from pathlib import Path

    from export.synth import render_video

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        labels = render_video(path, seed=seed, seconds=seconds)
        return path.read_bytes(), labels


@pytest.fixture(scope="module")
def long_dive() -> tuple[bytes, dict]:
    """20 s at 15 fps = 300 frames: more than one of the gateway's windows (256 frames)."""
    return render(seed=31, seconds=20.0)


def decoded_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def whole_video(triton, model: str, frames: np.ndarray) -> dict[str, np.ndarray]:
    """The model on all frames at once, straight from Triton (no gateway, no windows)."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        config = client.get_model_config(model, as_json=True)["config"]
        tensor = grpcclient.InferInput("frames", [1, *frames.shape], "UINT8")
        tensor.set_data_from_numpy(frames[None])
        outputs = [t["name"] for t in config["output"]]
        result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
        return {"config": config} | {n: result.as_numpy(n)[0] for n in outputs}
    finally:
        client.close()


async def test_segments_and_embeddings_come_back_and_equal_the_models_on_the_whole_video(stub, triton, long_dive):
    data, labels = long_dive
    response = await analyze(stub, data, embeddings=True)
    frames = pool_frames(decoded_frames(data), 28)
    assert len(frames) == labels["num_frames"] == 300

    # Embeddings: one unit row per sampled frame at 1/15 s steps, packed float16.
    e = response.embeddings
    assert e.values.dtype == "float16" and list(e.values.shape) == [300, 128] and e.fps == FPS
    values = tensor_array(e.values).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose(np.diff(e.times_s), 1 / FPS, atol=1e-6)
    whole = whole_video(triton, "frame_embedder", frames)
    np.testing.assert_allclose(values, whole["embeddings"], atol=3e-3)  # float16 rounding

    # Segments tile the frames; boundaries are where one ends and the next starts.
    segments = list(response.segments)
    assert segments and segments[0].start_s == pytest.approx(0.0, abs=1e-6)
    assert segments[-1].end_s == pytest.approx(20.0, abs=1 / FPS)
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(segments, segments[1:]))
    assert list(response.boundaries_s) == pytest.approx([s.start_s for s in segments[1:]])
    parsed = whole_video(triton, "action_parser", frames)
    spec = frame_model_spec(parsed["config"])
    patterns = parsed["responses"].shape[1]
    assert all(0 <= s.pattern < patterns and 0 <= s.confidence <= 1 + 1e-6 for s in segments)
    expected, boundaries = decode_segments(parsed["boundary_scores"], parsed["responses"], np.arange(300) / FPS,
                                           20.0, threshold=spec.boundary_threshold,
                                           max_boundaries=spec.max_boundaries)
    assert list(response.boundaries_s) == pytest.approx(boundaries, abs=1e-6)
    assert [s.pattern for s in segments] == [s.pattern for s in expected]
    assert [s.confidence for s in segments] == pytest.approx([s.confidence for s in expected], abs=1e-4)
    assert response.timing_ms["frame_models"] > 0


async def test_embeddings_are_opt_in_and_segments_can_be_left_out(stub, videos):
    data = videos["normal"].read_bytes()
    default = await analyze(stub, data)
    assert not default.HasField("embeddings") and len(default.segments) >= 1
    bare = await analyze(stub, data, omit_segments=True)
    assert not bare.HasField("embeddings") and not bare.segments and not bare.boundaries_s
    assert "frame_models" not in bare.timing_ms
    assert [a.attribute for a in bare.answers] == [a.attribute for a in default.answers]


async def test_a_video_shorter_than_a_clip_has_one_frame_per_sampled_frame(stub, videos):
    response = await analyze(stub, videos["short"].read_bytes(), embeddings=True)
    frames = len(response.embeddings.times_s)
    assert frames == round(0.3 * FPS) and list(response.embeddings.values.shape) == [frames, 128]
    assert response.segments[-1].end_s == pytest.approx(response.video.duration_s, abs=1 / FPS)


def f1_at(predicted: list[float], truth: list[float], tolerance_s: float) -> tuple[int, int, int]:
    """(hits, predicted, true) with one-to-one matching, closest pairs first."""
    pairs = sorted((abs(p - t), i, j) for i, p in enumerate(predicted) for j, t in enumerate(truth)
                   if abs(p - t) <= tolerance_s)
    used_p, used_t = set(), set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return len(used_p), len(predicted), len(truth)


def f1(counts: list[tuple[int, int, int]]) -> float:
    hits, predicted, truth = (sum(c[k] for c in counts) for k in range(3))
    return 2 * hits / max(predicted + truth, 1)


async def test_boundaries_land_near_the_truth_on_generated_videos(stub):
    """Eight generated dives (seeds the models were not trained on): boundary F1 at 0.2 s (3
    frames) with one-to-one matching, against the same number of boundaries evenly spaced over
    the video (the issue's weakest baseline, computed here on the same videos)."""
    served, even = [], []
    for seed in range(900_001, 900_009):
        data, labels = render(seed, seconds=6.0)
        response = await analyze(stub, data)
        truth = labels["boundaries_s"]
        predicted = list(response.boundaries_s)
        served.append(f1_at(predicted, truth, 0.2))
        spaced = list(np.linspace(0, labels["duration_s"], len(truth) + 2)[1:-1])
        even.append(f1_at(spaced, truth, 0.2))
    served_f1, even_f1 = f1(served), f1(even)
    print(f"boundary F1 at 0.2 s on 8 videos: served {served_f1:.3f}, evenly spaced {even_f1:.3f}")
    assert served_f1 >= 0.85 and served_f1 > even_f1 + 0.5


async def test_a_stream_ends_with_the_segments_analyze_gives_for_the_same_bytes(stub, tmp_path):
    """AnalyzeStream's final event carries the whole stream's segments: a generated dive sent as
    MPEG-TS in archive mode ends with the boundaries and patterns Analyze gives for the same bytes
    (both parse every decoded frame), near the truth; window events carry none."""
    from tests.integration.test_stream import FINAL, collect, windows
    from tests.media import ffmpeg

    data, labels = render(seed=900_021, seconds=6.0)
    (tmp_path / "dive.mp4").write_bytes(data)
    ffmpeg("-i", str(tmp_path / "dive.mp4"), "-c", "copy", "-f", "mpegts", str(tmp_path / "dive.ts"))
    ts = (tmp_path / "dive.ts").read_bytes()
    analyzed = await analyze(stub, ts)
    events = await collect(stub, pb.StreamOptions(window_clips=4, hop_clips=2, mode=pb.STREAM_MODE_ARCHIVE), ts)
    final = events[-1]
    assert final.kind == FINAL and not final.error
    assert len(analyzed.boundaries_s) >= 3
    np.testing.assert_allclose(final.result.boundaries_s, analyzed.boundaries_s, atol=1 / FPS + 1e-6)
    assert [s.pattern for s in final.result.segments] == [s.pattern for s in analyzed.segments]
    assert final.result.segments[-1].end_s == pytest.approx(analyzed.segments[-1].end_s, abs=1e-3)
    hits, _, _ = f1_at(list(final.result.boundaries_s), labels["boundaries_s"], 0.2)
    assert hits >= 3
    assert windows(events) and not any(w.result.segments or w.result.boundaries_s for w in windows(events))
