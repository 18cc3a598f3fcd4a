from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_MODE_UNSPECIFIED: _ClassVar[StreamMode]
    STREAM_MODE_REALTIME: _ClassVar[StreamMode]
    STREAM_MODE_ARCHIVE: _ClassVar[StreamMode]
STREAM_MODE_UNSPECIFIED: StreamMode
STREAM_MODE_REALTIME: StreamMode
STREAM_MODE_ARCHIVE: StreamMode

class AnalyzeRequest(_message.Message):
    __slots__ = ("video", "uri", "encoder", "budget", "embeddings", "omit_segments")
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    OMIT_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    video: bytes
    uri: str
    encoder: str
    budget: float
    embeddings: bool
    omit_segments: bool
    def __init__(self, video: _Optional[bytes] = ..., uri: _Optional[str] = ..., encoder: _Optional[str] = ..., budget: _Optional[float] = ..., embeddings: _Optional[bool] = ..., omit_segments: _Optional[bool] = ...) -> None: ...

class VideoInfo(_message.Message):
    __slots__ = ("duration_s", "fps", "clips", "frames", "width", "height")
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    CLIPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    duration_s: float
    fps: float
    clips: int
    frames: int
    width: int
    height: int
    def __init__(self, duration_s: _Optional[float] = ..., fps: _Optional[float] = ..., clips: _Optional[int] = ..., frames: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("query", "attribute", "probability", "distribution")
    class DistributionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    query: str
    attribute: str
    probability: float
    distribution: _containers.ScalarMap[str, float]
    def __init__(self, query: _Optional[str] = ..., attribute: _Optional[str] = ..., probability: _Optional[float] = ..., distribution: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ClipSpan(_message.Message):
    __slots__ = ("start_s", "end_s")
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    start_s: float
    end_s: float
    def __init__(self, start_s: _Optional[float] = ..., end_s: _Optional[float] = ...) -> None: ...

class Attention(_message.Message):
    __slots__ = ("query", "weights", "clip_spans")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CLIP_SPANS_FIELD_NUMBER: _ClassVar[int]
    query: str
    weights: _containers.RepeatedScalarFieldContainer[float]
    clip_spans: _containers.RepeatedCompositeFieldContainer[ClipSpan]
    def __init__(self, query: _Optional[str] = ..., weights: _Optional[_Iterable[float]] = ..., clip_spans: _Optional[_Iterable[_Union[ClipSpan, _Mapping]]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("video", "answers", "attention", "timing_ms", "encoder", "request_id", "domain", "segments", "boundaries_s", "embeddings", "compute")
    class TimingMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    TIMING_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    BOUNDARIES_S_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    video: VideoInfo
    answers: _containers.RepeatedCompositeFieldContainer[Answer]
    attention: _containers.RepeatedCompositeFieldContainer[Attention]
    timing_ms: _containers.ScalarMap[str, float]
    encoder: str
    request_id: str
    domain: Domain
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    boundaries_s: _containers.RepeatedScalarFieldContainer[float]
    embeddings: FrameEmbeddings
    compute: Compute
    def __init__(self, video: _Optional[_Union[VideoInfo, _Mapping]] = ..., answers: _Optional[_Iterable[_Union[Answer, _Mapping]]] = ..., attention: _Optional[_Iterable[_Union[Attention, _Mapping]]] = ..., timing_ms: _Optional[_Mapping[str, float]] = ..., encoder: _Optional[str] = ..., request_id: _Optional[str] = ..., domain: _Optional[_Union[Domain, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., boundaries_s: _Optional[_Iterable[float]] = ..., embeddings: _Optional[_Union[FrameEmbeddings, _Mapping]] = ..., compute: _Optional[_Union[Compute, _Mapping]] = ...) -> None: ...

class Compute(_message.Message):
    __slots__ = ("encoder", "budget", "knob", "adaptive", "kept_ratio", "gmacs_per_clip", "clips")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    KNOB_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    KEPT_RATIO_FIELD_NUMBER: _ClassVar[int]
    GMACS_PER_CLIP_FIELD_NUMBER: _ClassVar[int]
    CLIPS_FIELD_NUMBER: _ClassVar[int]
    encoder: str
    budget: float
    knob: int
    adaptive: str
    kept_ratio: float
    gmacs_per_clip: float
    clips: _containers.RepeatedCompositeFieldContainer[ClipCompute]
    def __init__(self, encoder: _Optional[str] = ..., budget: _Optional[float] = ..., knob: _Optional[int] = ..., adaptive: _Optional[str] = ..., kept_ratio: _Optional[float] = ..., gmacs_per_clip: _Optional[float] = ..., clips: _Optional[_Iterable[_Union[ClipCompute, _Mapping]]] = ...) -> None: ...

class ClipCompute(_message.Message):
    __slots__ = ("kept", "gmacs")
    KEPT_FIELD_NUMBER: _ClassVar[int]
    GMACS_FIELD_NUMBER: _ClassVar[int]
    kept: _containers.RepeatedScalarFieldContainer[int]
    gmacs: float
    def __init__(self, kept: _Optional[_Iterable[int]] = ..., gmacs: _Optional[float] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("start_s", "end_s", "pattern", "confidence")
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    start_s: float
    end_s: float
    pattern: int
    confidence: float
    def __init__(self, start_s: _Optional[float] = ..., end_s: _Optional[float] = ..., pattern: _Optional[int] = ..., confidence: _Optional[float] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class FrameEmbeddings(_message.Message):
    __slots__ = ("values", "times_s", "fps", "features")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIMES_S_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    times_s: _containers.RepeatedScalarFieldContainer[float]
    fps: float
    features: Tensor
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ..., times_s: _Optional[_Iterable[float]] = ..., fps: _Optional[float] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Domain(_message.Message):
    __slots__ = ("score", "threshold", "in_domain")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IN_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    score: float
    threshold: float
    in_domain: bool
    def __init__(self, score: _Optional[float] = ..., threshold: _Optional[float] = ..., in_domain: _Optional[bool] = ...) -> None: ...

class DescribeModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QuerySpec(_message.Message):
    __slots__ = ("query", "attributes")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    query: str
    attributes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query: _Optional[str] = ..., attributes: _Optional[_Iterable[str]] = ...) -> None: ...

class DescribeModelsResponse(_message.Message):
    __slots__ = ("queries", "encoders", "default_encoder", "clip_frames", "frame_size", "max_upload_bytes", "max_duration_s", "clip_fps", "encoder_details")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    ENCODERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    CLIP_FPS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_DETAILS_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[QuerySpec]
    encoders: _containers.RepeatedScalarFieldContainer[str]
    default_encoder: str
    clip_frames: int
    frame_size: int
    max_upload_bytes: int
    max_duration_s: float
    clip_fps: float
    encoder_details: _containers.RepeatedCompositeFieldContainer[EncoderDetails]
    def __init__(self, queries: _Optional[_Iterable[_Union[QuerySpec, _Mapping]]] = ..., encoders: _Optional[_Iterable[str]] = ..., default_encoder: _Optional[str] = ..., clip_frames: _Optional[int] = ..., frame_size: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ..., max_duration_s: _Optional[float] = ..., clip_fps: _Optional[float] = ..., encoder_details: _Optional[_Iterable[_Union[EncoderDetails, _Mapping]]] = ...) -> None: ...

class EncoderDetails(_message.Message):
    __slots__ = ("name", "adaptive", "knob", "knob_full", "knob_min", "gmacs_per_clip", "clip_frames", "frame_size", "clip_fps", "budget_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    KNOB_FIELD_NUMBER: _ClassVar[int]
    KNOB_FULL_FIELD_NUMBER: _ClassVar[int]
    KNOB_MIN_FIELD_NUMBER: _ClassVar[int]
    GMACS_PER_CLIP_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIP_FPS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    adaptive: str
    knob: str
    knob_full: int
    knob_min: int
    gmacs_per_clip: float
    clip_frames: int
    frame_size: int
    clip_fps: float
    budget_default: float
    def __init__(self, name: _Optional[str] = ..., adaptive: _Optional[str] = ..., knob: _Optional[str] = ..., knob_full: _Optional[int] = ..., knob_min: _Optional[int] = ..., gmacs_per_clip: _Optional[float] = ..., clip_frames: _Optional[int] = ..., frame_size: _Optional[int] = ..., clip_fps: _Optional[float] = ..., budget_default: _Optional[float] = ...) -> None: ...

class StreamOptions(_message.Message):
    __slots__ = ("encoder", "window_clips", "hop_clips", "mode", "omit_window_attention", "producer_start_unix_s", "resume_token", "budget")
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_CLIPS_FIELD_NUMBER: _ClassVar[int]
    HOP_CLIPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OMIT_WINDOW_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    encoder: str
    window_clips: int
    hop_clips: int
    mode: StreamMode
    omit_window_attention: bool
    producer_start_unix_s: float
    resume_token: str
    budget: float
    def __init__(self, encoder: _Optional[str] = ..., window_clips: _Optional[int] = ..., hop_clips: _Optional[int] = ..., mode: _Optional[_Union[StreamMode, str]] = ..., omit_window_attention: _Optional[bool] = ..., producer_start_unix_s: _Optional[float] = ..., resume_token: _Optional[str] = ..., budget: _Optional[float] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("options", "chunk")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    options: StreamOptions
    chunk: bytes
    def __init__(self, options: _Optional[_Union[StreamOptions, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class StreamEvent(_message.Message):
    __slots__ = ("kind", "start_s", "end_s", "window", "first_clip", "last_clip", "result", "model_version", "resume_token", "dropped_clips", "dropped_clips_total", "lag_s", "producer_time_unix_s", "error", "note", "received_bytes", "clips_decoded", "clips_analysed")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[StreamEvent.Kind]
        PROGRESS: _ClassVar[StreamEvent.Kind]
        WINDOW: _ClassVar[StreamEvent.Kind]
        FINAL: _ClassVar[StreamEvent.Kind]
    KIND_UNSPECIFIED: StreamEvent.Kind
    PROGRESS: StreamEvent.Kind
    WINDOW: StreamEvent.Kind
    FINAL: StreamEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    START_S_FIELD_NUMBER: _ClassVar[int]
    END_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    FIRST_CLIP_FIELD_NUMBER: _ClassVar[int]
    LAST_CLIP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_CLIPS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_CLIPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAG_S_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLIPS_DECODED_FIELD_NUMBER: _ClassVar[int]
    CLIPS_ANALYSED_FIELD_NUMBER: _ClassVar[int]
    kind: StreamEvent.Kind
    start_s: float
    end_s: float
    window: int
    first_clip: int
    last_clip: int
    result: AnalyzeResponse
    model_version: str
    resume_token: str
    dropped_clips: int
    dropped_clips_total: int
    lag_s: float
    producer_time_unix_s: float
    error: str
    note: str
    received_bytes: int
    clips_decoded: int
    clips_analysed: int
    def __init__(self, kind: _Optional[_Union[StreamEvent.Kind, str]] = ..., start_s: _Optional[float] = ..., end_s: _Optional[float] = ..., window: _Optional[int] = ..., first_clip: _Optional[int] = ..., last_clip: _Optional[int] = ..., result: _Optional[_Union[AnalyzeResponse, _Mapping]] = ..., model_version: _Optional[str] = ..., resume_token: _Optional[str] = ..., dropped_clips: _Optional[int] = ..., dropped_clips_total: _Optional[int] = ..., lag_s: _Optional[float] = ..., producer_time_unix_s: _Optional[float] = ..., error: _Optional[str] = ..., note: _Optional[str] = ..., received_bytes: _Optional[int] = ..., clips_decoded: _Optional[int] = ..., clips_analysed: _Optional[int] = ...) -> None: ...
