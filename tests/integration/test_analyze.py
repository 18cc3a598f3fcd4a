"""Analyze through the real gateway, decoder and Triton."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.proto import video_analytics_pb2 as pb
from server.triton import QUERIES

pytestmark = pytest.mark.integration


async def analyze(stub, path, **kwargs) -> pb.AnalyzeResponse:
    return await stub.Analyze(pb.AnalyzeRequest(video=path.read_bytes(), **kwargs), timeout=120)


async def test_analyze_answers_every_query(stub, videos):
    response = await analyze(stub, videos["normal"])

    assert [a.query for a in response.answers] == list(QUERIES)
    for answer in response.answers:
        assert math.isclose(sum(answer.distribution.values()), 1.0, abs_tol=1e-4)
        assert answer.attribute in answer.distribution
        assert answer.probability == pytest.approx(max(answer.distribution.values()), abs=1e-6)
    video = response.video
    assert video.clips >= 2
    assert video.width == 112 and video.height == 112
    assert video.fps == pytest.approx(15, abs=0.5)
    assert video.duration_s == pytest.approx(4.0, abs=0.5)
    assert response.encoder == "s3d"
    assert response.request_id
    assert {"decode", "encode", "decode_queries", "total"} <= set(response.timing_ms)


async def test_attention_is_queries_by_clips_and_rows_sum_to_one(stub, videos):
    response = await analyze(stub, videos["normal"])
    clips = response.video.clips

    assert [m.query for m in response.attention] == list(QUERIES)
    for attention in response.attention:
        weights = np.asarray(attention.weights)
        assert weights.shape == (clips,)
        assert weights.min() >= 0
        assert weights.sum() == pytest.approx(1.0, abs=1e-4)
        spans = [(s.start_s, s.end_s) for s in attention.clip_spans]
        assert len(spans) == clips
        assert all(start < end for start, end in spans)
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:]))


async def test_video_shorter_than_one_clip_is_one_clip(stub, videos):
    response = await analyze(stub, videos["short"])

    assert response.video.clips == 1
    assert 1 <= response.video.frames < 8
    assert all(len(m.weights) == 1 and m.weights[0] == pytest.approx(1.0) for m in response.attention)


async def test_another_codec(stub, videos):
    response = await analyze(stub, videos["mpeg4"])
    assert response.video.clips >= 1
    assert len(response.answers) == len(QUERIES)


async def test_corrupt_file_is_invalid_argument_and_server_stays_healthy(stub, channel, videos):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await analyze(stub, videos["corrupt"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decode" in error.value.details().lower()  # the decoder's reason, not a bare status
    assert "Traceback" not in error.value.details()

    health = health_pb2_grpc.HealthStub(channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service="vqs.v1.VideoAnalytics"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    response = await analyze(stub, videos["normal"])
    assert len(response.answers) == len(QUERIES)


async def test_garbage_bytes_are_invalid_argument(stub):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Analyze(pb.AnalyzeRequest(video=b"definitely not a video" * 50))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_empty_upload_is_invalid_argument(stub):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Analyze(pb.AnalyzeRequest(video=b""))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in error.value.details()


async def test_no_source_is_invalid_argument(stub):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Analyze(pb.AnalyzeRequest())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_encoder_lists_the_available_ones(stub, videos):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await analyze(stub, videos["short"], encoder="nonexistent")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nonexistent" in error.value.details() and "s3d" in error.value.details()


async def test_request_id_comes_back_in_trailing_metadata(stub, videos):
    call = stub.Analyze(
        pb.AnalyzeRequest(video=videos["short"].read_bytes()),
        metadata=(("x-request-id", "test-req-42"),),
    )
    response = await call
    trailing = dict(await call.trailing_metadata())
    assert response.request_id == "test-req-42"
    assert trailing["x-request-id"] == "test-req-42"


@pytest.fixture(scope="module")
def high_frame_rate(tmp_path_factory):
    """The same six routines rendered at the encoder's 15 fps and at 30 fps, with labels."""
    import json

    from export.synth import write_dataset

    out = tmp_path_factory.mktemp("frame_rates")
    sets = {}
    for fps in (15, 30):
        folder = out / f"fps{fps}"
        labels_file = write_dataset(folder, count=6, seed=777, fps=fps, codec="h264",
                                    min_seconds=4.0, max_seconds=10.0, workers=1)
        labels = [json.loads(line) for line in labels_file.read_text().splitlines()]
        sets[fps] = [(folder / row["file"], row) for row in labels]
    return sets


async def test_a_30_fps_video_is_sampled_at_the_encoders_rate(stub, high_frame_rate):
    # Clips of consecutive 30 fps frames show the encoder half the motion it learnt: counts of
    # somersaults and twists fell to ~40% correct. Sampled at 15 fps, it answers like the 15 fps render.
    for (path15, labels), (path30, _) in zip(high_frame_rate[15], high_frame_rate[30]):
        at15, at30 = await analyze(stub, path15), await analyze(stub, path30)
        assert at30.video.fps == pytest.approx(30, abs=0.5)
        # The same clips encoded (durations round to whole frames); non-reference frames of the
        # 30 fps video are not even decoded.
        assert abs(at30.video.clips - at15.video.clips) <= 1
        assert at15.video.frames <= at30.video.frames < 2 * at15.video.frames
        spans = [(s.start_s, s.end_s) for s in at30.attention[0].clip_spans]
        assert spans[0] == pytest.approx((0.0, 8 / 15), abs=1e-3)  # 8 samples 1/15 s apart
        answers15 = {a.query: a.attribute for a in at15.answers}
        answers30 = {a.query: a.attribute for a in at30.answers}
        for query in ("somersaults", "twists", "flight_pose"):
            assert answers30[query] == answers15[query] == labels[query], (path30.name, query)
