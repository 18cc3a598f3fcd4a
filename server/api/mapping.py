"""Domain results <-> `vqs.v1` protobuf messages."""

from __future__ import annotations

import numpy as np

from server.errors import InvalidInput
from server.pipeline.analyze import EncoderSpec, ModelCatalog  # the catalog's encoders are EncoderSpecs
from server.pipeline.assemble import AnalysisResult, Compute
from server.pipeline.segments import FrameResults
from server.pipeline.stream import EventKind, ResumeToken, StreamEvent, StreamLimits, StreamOptions
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
    compute = getattr(result, "compute", None)
    if compute is not None:
        response.compute.CopyFrom(compute_message(compute))
    frames = getattr(result, "frames", None)
    if frames is not None:
        add_frame_results(response, frames)
    return response


def add_frame_results(response: pb.AnalyzeResponse, frames: FrameResults) -> None:
    """Segments, boundaries and (when computed) embeddings as a packed little-endian tensor."""
    response.segments.extend(
        pb.Segment(start_s=s.start_s, end_s=s.end_s, pattern=s.pattern, confidence=s.confidence)
        for s in frames.segments)
    response.boundaries_s.extend(frames.boundaries_s)
    if frames.embeddings is not None:
        response.embeddings.CopyFrom(pb.FrameEmbeddings(
            values=tensor(frames.embeddings), times_s=frames.times_s.tolist(), fps=frames.fps))
        if frames.features is not None:
            response.embeddings.features.CopyFrom(tensor(frames.features))


def tensor(values: np.ndarray) -> pb.Tensor:
    """A packed little-endian tensor."""
    values = values.astype(values.dtype.newbyteorder("<"), copy=False)
    return pb.Tensor(data=values.tobytes(), shape=list(values.shape), dtype=values.dtype.name)


def budget(value: float) -> float:
    """A request's compute budget: proto3's 0 (unset) is full compute."""
    return 1.0 if value == 0 else value


def compute_message(compute: Compute) -> pb.Compute:
    message = pb.Compute(
        encoder=compute.encoder,
        budget=compute.budget,
        knob=compute.knob or 0,
        adaptive=compute.adaptive or "",
        kept_ratio=compute.kept_ratio if compute.kept_ratio is not None else 0.0,
        gmacs_per_clip=compute.gmacs_per_clip or 0.0,
    )
    if compute.kept is not None:
        gmacs = compute.gmacs if compute.gmacs is not None else [0.0] * len(compute.kept)
        message.clips.extend(
            pb.ClipCompute(kept=row.tolist(), gmacs=float(g)) for row, g in zip(compute.kept, gmacs)
        )
    return message


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
        encoder_details=[encoder_details(models.encoders[name]) for name in sorted(models.encoders)],
    )


def encoder_details(spec: EncoderSpec) -> pb.EncoderDetails:
    adaptive = spec.adaptive
    return pb.EncoderDetails(
        name=spec.encoder,
        adaptive=adaptive.kind if adaptive else "",
        knob=adaptive.knob if adaptive else "",
        knob_full=adaptive.units if adaptive else 0,
        knob_min=adaptive.floor if adaptive else 0,
        gmacs_per_clip=spec.gmacs_per_clip or 0.0,
        clip_frames=spec.clip_frames,
        frame_size=spec.frame_size,
        clip_fps=spec.clip_fps or 0.0,
        budget_default=(adaptive.default or 0.0) if adaptive else 0.0,
    )


_MODES = {
    pb.STREAM_MODE_UNSPECIFIED: "realtime",
    pb.STREAM_MODE_REALTIME: "realtime",
    pb.STREAM_MODE_ARCHIVE: "archive",
}
_KINDS = {
    EventKind.PROGRESS: pb.StreamEvent.PROGRESS,
    EventKind.WINDOW: pb.StreamEvent.WINDOW,
    EventKind.FINAL: pb.StreamEvent.FINAL,
}


def stream_options(message: pb.StreamOptions, encoder: str, limits: StreamLimits) -> StreamOptions:
    """The stream's options (`encoder`: its validated name), checked; `InvalidInput` names the
    field and its bounds."""
    window = message.window_clips or limits.window_clips
    hop = message.hop_clips or window
    if not 1 <= window <= limits.max_window_clips:
        raise InvalidInput(
            f"window_clips {message.window_clips} is outside 1..{limits.max_window_clips} "
            "(limits.stream_max_window_clips; 0 = the server's default)"
        )
    if not 1 <= hop <= window:
        raise InvalidInput(f"hop_clips {message.hop_clips} is outside 1..window_clips ({window})")
    if message.mode not in _MODES:
        raise InvalidInput(f"unknown stream mode {message.mode}")
    producer = message.producer_start_unix_s
    if producer < 0 or producer != producer or producer == float("inf"):
        raise InvalidInput(f"producer_start_unix_s {producer!r} is not a time")
    return StreamOptions(
        encoder=encoder,
        window_clips=window,
        hop_clips=hop,
        mode=_MODES[message.mode],
        window_attention=not message.omit_window_attention,
        producer_start_unix_s=producer or None,
        resume=ResumeToken.parse(message.resume_token) if message.resume_token else None,
        budget=budget(message.budget),
    )


def stream_event(event: StreamEvent, request_id: str) -> pb.StreamEvent:
    message = pb.StreamEvent(
        kind=_KINDS[event.kind],
        start_s=event.start_s,
        end_s=event.end_s,
        window=event.window,
        first_clip=event.first_clip,
        last_clip=event.last_clip,
        model_version=event.model_version,
        resume_token=event.resume_token,
        dropped_clips=event.dropped_clips,
        dropped_clips_total=event.dropped_clips_total,
        lag_s=event.lag_s,
        producer_time_unix_s=event.producer_time_unix_s or 0.0,
        error=event.error,
        note=event.note,
        received_bytes=event.received_bytes,
        clips_decoded=event.clips_decoded,
        clips_analysed=event.clips_analysed,
    )
    if event.result is not None:
        message.result.CopyFrom(analyze_response(event.result, request_id))
    return message
