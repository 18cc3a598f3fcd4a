"""Domain results <-> `vqs.v1` protobuf messages."""

from __future__ import annotations

from collections.abc import Sequence

from server.pipeline.assemble import AnalysisResult, QuerySpec
from server.proto import video_analytics_pb2 as pb


def analyze_response(result: AnalysisResult, request_id: str) -> pb.AnalyzeResponse:
    v = result.video
    response = pb.AnalyzeResponse(
        video=pb.VideoInfo(
            duration_s=v.duration_s, fps=v.fps, clips=v.clips, frames=v.frames,
            width=v.width, height=v.height,
        ),
        encoder=result.encoder,
        request_id=request_id,
    )
    for a in result.answers:
        response.answers.append(
            pb.Answer(query=a.query, attribute=a.attribute, probability=a.probability,
                      distribution=a.distribution)
        )
    for m in result.attention:
        response.attention.append(
            pb.Attention(
                query=m.query,
                weights=m.weights.tolist(),
                clip_spans=[pb.ClipSpan(start_s=float(s), end_s=float(e)) for s, e in m.spans_s],
            )
        )
    response.timing_ms.update(result.timing_ms)
    return response


def describe_response(
    queries: Sequence[QuerySpec],
    encoders: Sequence[str],
    *,
    default_encoder: str,
    clip_frames: int,
    frame_size: int,
    clip_fps: float,
    max_upload_bytes: int,
    max_duration_s: float,
) -> pb.DescribeModelsResponse:
    return pb.DescribeModelsResponse(
        queries=[pb.QuerySpec(query=q.query, attributes=list(q.attributes)) for q in queries],
        encoders=sorted(encoders),
        default_encoder=default_encoder,
        clip_frames=clip_frames,
        frame_size=frame_size,
        clip_fps=clip_fps,
        max_upload_bytes=max_upload_bytes,
        max_duration_s=max_duration_s,
    )
