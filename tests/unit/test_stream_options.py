"""StreamOptions from the wire: defaults, bounds and refusals that name the field; events to proto."""

from __future__ import annotations

import pytest

from server.api import mapping
from server.errors import InvalidInput
from server.pipeline.stream import EventKind, ResumeToken, StreamEvent, StreamLimits
from server.proto import video_analytics_pb2 as pb
from server.settings import LimitsSettings

LIMITS = StreamLimits.from_settings(LimitsSettings())


def test_defaults_come_from_the_limits():
    options = mapping.stream_options(pb.StreamOptions(), "s3d", LIMITS)
    assert (options.window_clips, options.hop_clips) == (LIMITS.window_clips, LIMITS.window_clips)
    assert options.mode == "realtime" and options.window_attention
    assert options.producer_start_unix_s is None and options.resume is None


def test_options_are_mapped():
    message = pb.StreamOptions(window_clips=6, hop_clips=2, mode=pb.STREAM_MODE_ARCHIVE,
                               omit_window_attention=True, producer_start_unix_s=1.7e9,
                               resume_token="v1:5:3.2")
    options = mapping.stream_options(message, "s3d", LIMITS)
    assert (options.window_clips, options.hop_clips, options.mode) == (6, 2, "archive")
    assert not options.window_attention and options.producer_start_unix_s == 1.7e9
    assert options.resume == ResumeToken(5, 3.2)


@pytest.mark.parametrize("fields, named", [
    ({"window_clips": LIMITS.max_window_clips + 1}, "stream_max_window_clips"),
    ({"window_clips": -1}, "window_clips"),
    ({"window_clips": 4, "hop_clips": 5}, "hop_clips"),
    ({"mode": 7}, "mode"),
    ({"producer_start_unix_s": float("nan")}, "producer_start_unix_s"),
    ({"resume_token": "not a token"}, "resume_token"),
])
def test_bad_options_are_invalid_argument_naming_the_field(fields, named):
    with pytest.raises(InvalidInput, match=named):
        mapping.stream_options(pb.StreamOptions(**fields), "s3d", LIMITS)


def test_events_map_to_proto_without_a_result_where_there_is_none():
    event = StreamEvent(EventKind.PROGRESS, end_s=2.5, note="spilled", received_bytes=10, clips_decoded=3)
    message = mapping.stream_event(event, "req")
    assert message.kind == pb.StreamEvent.PROGRESS and not message.HasField("result")
    assert (message.end_s, message.note, message.received_bytes, message.clips_decoded) == (2.5, "spilled", 10, 3)
    assert message.producer_time_unix_s == 0.0
