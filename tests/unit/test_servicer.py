"""The servicer talks only to the pipeline: proto -> domain, `Analyzer`, domain -> proto."""

from __future__ import annotations

import numpy as np
import pytest

from server.api.servicer import VideoAnalyticsServicer, validate_encoder_name
from server.errors import BackendUnavailable, InvalidInput
from server.pipeline.analyze import AnalyzeJob, ModelCatalog
from server.pipeline.assemble import AnalysisResult, Answer, AttentionMap
from server.pipeline.decode import VideoInfo
from server.proto import video_analytics_pb2 as pb
from server.settings import Settings
from server.triton import EncoderSpec, QuerySpec

S3D = EncoderSpec("s3d", "clip_encoder_s3d", 8, 112, 256, 64, clip_fps=15.0)
QUERIES = (QuerySpec("take_off", ("forward", "back")),)


class FakeAnalyzer:
    """Everything the servicer may use of the pipeline; no Triton anywhere."""

    def __init__(self):
        self.jobs: list[AnalyzeJob] = []

    async def encoder(self, name: str) -> EncoderSpec:
        if name != "s3d":
            raise InvalidInput(f"unknown encoder {name!r}; available: s3d")
        return S3D

    async def models(self) -> ModelCatalog:
        return ModelCatalog(queries=QUERIES, encoders={"s3d": S3D})

    async def analyze(self, job: AnalyzeJob) -> AnalysisResult:
        self.jobs.append(job)
        spans = np.array([[0.0, 0.5], [0.5, 1.0]])
        return AnalysisResult(
            encoder=job.encoder,
            video=VideoInfo(fps=15.0, width=112, height=112, frames=15, duration_s=1.0),
            clips=2,
            answers=[Answer("take_off", "back", 0.8, {"forward": 0.2, "back": 0.8})],
            attention=[AttentionMap("take_off", np.array([0.25, 0.75]), spans)],
            timing_ms={"total": 5.0},
        )


class Context:
    def time_remaining(self):
        return None


def servicer(unavailable=lambda: None) -> tuple[VideoAnalyticsServicer, FakeAnalyzer]:
    analyzer = FakeAnalyzer()
    return VideoAnalyticsServicer(Settings(), analyzer, unavailable=unavailable), analyzer


async def test_analyze_maps_the_request_and_the_result():
    svc, analyzer = servicer()
    response = await svc.Analyze(pb.AnalyzeRequest(video=b"bytes", encoder=" "), Context())
    assert analyzer.jobs == [AnalyzeJob(source=b"bytes", encoder="s3d")]  # the default encoder
    assert (response.video.clips, response.video.frames, response.encoder) == (2, 15, "s3d")
    assert [(a.query, a.attribute) for a in response.answers] == [("take_off", "back")]
    assert [s.end_s for s in response.attention[0].clip_spans] == [0.5, 1.0]


async def test_describe_models_comes_from_the_pipeline():
    svc, _ = servicer()
    response = await svc.DescribeModels(pb.DescribeModelsRequest(), Context())
    assert [(q.query, list(q.attributes)) for q in response.queries] == [("take_off", ["forward", "back"])]
    assert list(response.encoders) == ["s3d"]
    assert (response.clip_frames, response.frame_size, response.clip_fps) == (8, 112, 15.0)


async def test_requests_are_validated_in_the_api():
    svc, analyzer = servicer()
    with pytest.raises(InvalidInput, match="invalid encoder name"):
        await svc.Analyze(pb.AnalyzeRequest(video=b"x", encoder="../s3d"), Context())
    with pytest.raises(InvalidInput, match="unknown encoder"):
        await svc.Analyze(pb.AnalyzeRequest(video=b"x", encoder="i3d"), Context())
    with pytest.raises(InvalidInput, match="set either"):
        await svc.Analyze(pb.AnalyzeRequest(), Context())
    assert analyzer.jobs == []


async def test_requests_are_refused_while_triton_is_down():
    svc, analyzer = servicer(unavailable=lambda: "Triton is restarting")
    with pytest.raises(BackendUnavailable, match="restarting"):
        await svc.Analyze(pb.AnalyzeRequest(video=b"x"), Context())


def test_encoder_names_are_checked_and_echoed_cut_short():
    assert validate_encoder_name("", "s3d") == "s3d"
    assert validate_encoder_name(" x3d_m ", "s3d") == "x3d_m"
    with pytest.raises(InvalidInput) as error:
        validate_encoder_name("e-" * 10_000, "s3d")
    assert len(str(error.value)) < 200
