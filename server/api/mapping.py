"""Domain results <-> `vqs.v1` protobuf messages."""

from __future__ import annotations

from server.pipeline.analyze import ModelCatalog
from server.pipeline.assemble import AnalysisResult
from server.proto import video_analytics_pb2 as pb


def analyze_response(result: AnalysisResult, request_id: str) -> pb.AnalyzeResponse:
    v = result.video
    response = pb.AnalyzeResponse(
        video=pb.VideoInfo(
            duration_s=v.duration_s, fps=v.fps, clips=result.clips, frames=v.frames,
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
    domain = getattr(result, "domain", None)
    if domain is not None:
        response.domain.CopyFrom(
            pb.Domain(score=domain.score, threshold=domain.threshold, in_domain=domain.in_domain)
        )
    return response


def describe_response(
    models: ModelCatalog,
    *,
    default_encoder: str,
    max_upload_bytes: int,
    max_duration_s: float,
) -> pb.DescribeModelsResponse:
    """Clip size and frame rate are the default encoder's (0 when it is not served)."""
    default = models.encoders.get(default_encoder)
    return pb.DescribeModelsResponse(
        queries=[pb.QuerySpec(query=q.query, attributes=list(q.attributes)) for q in models.queries],
        encoders=sorted(models.encoders),
        default_encoder=default_encoder,
        clip_frames=default.clip_frames if default else 0,
        frame_size=default.frame_size if default else 0,
        clip_fps=(default.clip_fps or 0.0) if default else 0.0,
        max_upload_bytes=max_upload_bytes,
        max_duration_s=max_duration_s,
    )
