"""A realtime stream's drop before decoding (`decode_backends.LiveReadahead`, with fake packets and
a clock the test moves): what is judged late and skipped, what is decoded, where decoding resumes,
how the demux thread stops; and the flags that keep clips with skipped frames in their place
(`decode._ClipMarks`, in step with `chunk.ClipAssembler`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest

from server.pipeline.chunk import ClipAssembler
from server.pipeline.decode import _ClipMarks
from server.pipeline.decode_backends import LiveReadahead, Skipped

FPS = 30
GOP = 30  # a keyframe a second
TIME_BASE = Fraction(1, FPS)  # a packet's pts is its frame number
MAX_LAG_S = 0.5


@dataclass(frozen=True)
class Packet:
    pts: int | None
    is_keyframe: bool
    size: int = 100
    duration: int = 1

    @property
    def dts(self) -> int | None:
        return self.pts


def frames(first: int, stop: int) -> list[Packet]:
    return [Packet(i, i % GOP == 0) for i in range(first, stop)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def settled(readahead: LiveReadahead) -> None:
    """Wait until the demux thread has read all it may (the source ended, or the readahead is full)."""
    for _ in range(2000):
        with readahead._cond:
            if readahead._ended or readahead._full():
                return
        time.sleep(0.005)
    raise AssertionError("the demux thread did not settle")


def consume(packets, clock: Clock, count: int | None = None) -> list:
    """Take packets as a decoder at real time speed would: each decoded one costs a frame's time;
    a skipped one costs nothing."""
    out = []
    for packet in packets:
        out.append(packet)
        if not isinstance(packet, Skipped):
            clock.now += 1 / FPS
        if count is not None and len(out) == count:
            break
    return out


def decoded_pts(items) -> list[int]:
    return [p.pts for p in items if not isinstance(p, Skipped)]


def test_a_feed_faster_than_real_time_is_decoded_whole():
    """Five seconds of video available at once: never behind real time, so nothing is skipped
    (the thread stops reading ahead instead, which slows the sender)."""
    clock = Clock()
    packets = frames(0, 5 * GOP)
    readahead = LiveReadahead(iter(packets), TIME_BASE, MAX_LAG_S, clock)
    clock.now = 100.0  # the decoder is faster than real time: its clock stands still
    out = list(readahead)
    assert out == packets


def test_a_skip_that_reaches_the_demuxer_waits_for_the_rest_of_the_burst():
    """After a stall the burst may reach the demuxer more slowly than skipping goes (a loaded
    gateway): the keyframe where the skip reaches the demuxer's front is still behind real time,
    so it waits for newer video instead of resuming there, and resumes once within the bound."""
    clock = Clock()
    resume, rest = threading.Event(), threading.Event()

    def source():
        yield from frames(0, GOP)
        resume.wait()
        yield from frames(GOP, 2 * GOP + 1)  # a second and the next keyframe, then a pause
        rest.wait()
        yield from frames(2 * GOP + 1, 5 * GOP)

    readahead = LiveReadahead(source(), TIME_BASE, MAX_LAG_S, clock)
    packets = iter(readahead)
    first = consume(packets, clock, GOP)
    clock.now += 3.0  # the stall
    resume.set()
    for _ in range(2000):  # until the demuxer has read up to the pause
        if readahead.newest_s >= 2.0:
            break
        time.sleep(0.005)
    threading.Timer(0.05, rest.set).start()
    out = first + consume(packets, clock)
    assert [p.pts for p in out] == list(range(5 * GOP))
    # Media time 2 s is 2 s behind real time once the burst is there: skipped; 4 s is live.
    assert decoded_pts(out) == list(range(GOP)) + list(range(4 * GOP, 5 * GOP))


def test_after_a_stall_the_decoder_skips_to_a_keyframe_within_the_bound():
    """A second at real time, then the sender stalls 3 s and bursts 4 s of video: the groups of
    pictures the stall made late are skipped whole; decoding resumes at the first keyframe that
    is not late, and every packet is accounted for in order."""
    clock = Clock()
    resume = threading.Event()

    def source():
        yield from frames(0, GOP)
        resume.wait()
        yield from frames(GOP, 5 * GOP)

    readahead = LiveReadahead(source(), TIME_BASE, MAX_LAG_S, clock)
    packets = iter(readahead)  # one decoder's pass
    first = consume(packets, clock, GOP)
    assert decoded_pts(first) == list(range(GOP))  # kept up: nothing skipped

    clock.now += 3.0  # the stall
    resume.set()
    settled(readahead)
    rest = consume(packets, clock)

    assert [p.pts for p in first + rest] == list(range(5 * GOP))  # one item per packet, in order
    skipped = [p.pts for p in rest if isinstance(p, Skipped)]
    assert skipped == list(range(GOP, 4 * GOP))  # the three late seconds, whole
    assert decoded_pts(rest) == list(range(4 * GOP, 5 * GOP))  # from a keyframe on
    assert all(isinstance(p, Packet) for p in rest if p.pts >= 4 * GOP)


def test_a_decoder_slower_than_real_time_keeps_within_the_bound():
    """Ten seconds of video there to read and a decoder taking three frames' time per frame: it
    keeps skipping, resumes only at keyframes, and decodes no frame more than the bound behind
    real time."""
    clock = Clock()
    readahead = LiveReadahead(iter(frames(0, 10 * GOP)), TIME_BASE, MAX_LAG_S, clock)
    out, lags = [], []
    for packet in readahead:
        out.append(packet)
        if not isinstance(packet, Skipped):
            lags.append(clock.now - readahead.anchor - packet.pts / FPS)
            clock.now += 3 / FPS

    assert [p.pts for p in out] == list(range(10 * GOP))  # one item per packet, in order
    kept = decoded_pts(out)
    assert len(kept) < 10 * GOP and any(pts >= GOP for pts in kept)
    for previous, packet in zip(out, out[1:]):  # never resumes in the middle of a GOP
        if not isinstance(packet, Skipped) and not packet.is_keyframe:
            assert not isinstance(previous, Skipped)
    assert max(lags) <= MAX_LAG_S + 1e-9


def test_packets_without_timestamps_are_never_judged_late():
    clock = Clock()
    packets = [Packet(None, i % GOP == 0) for i in range(3 * GOP)]
    readahead = LiveReadahead(iter(packets), TIME_BASE, MAX_LAG_S, clock)
    out = []
    for packet in readahead:
        out.append(packet)
        clock.now += 1.0  # far slower than real time
    assert out == packets


def test_stop_closes_after_the_thread_leaves_the_demuxer():
    release = threading.Event()
    closed = []

    def source():
        yield Packet(0, True)
        release.wait()  # blocked reading the pipe
        yield Packet(1, False)

    readahead = LiveReadahead(source(), TIME_BASE, MAX_LAG_S, Clock())
    assert next(iter(readahead)).pts == 0
    readahead.stop(then=lambda: closed.append(True))
    assert closed == []  # not while the thread may be inside the demuxer
    release.set()
    readahead._thread.join(5)
    assert closed == [True]

    done = LiveReadahead(iter(frames(0, 3)), TIME_BASE, MAX_LAG_S, Clock())
    done._thread.join(5)
    done.stop(then=lambda: closed.append("now"))
    assert closed == [True, "now"]


@pytest.mark.parametrize("seed", range(5))
def test_clip_marks_flag_the_clips_with_a_skipped_frame(seed):
    rng = np.random.default_rng(seed)
    clip_frames, n = 8, int(rng.integers(1, 60))
    skipped = rng.random(n) < 0.1
    assembler, marks = ClipAssembler(clip_frames), _ClipMarks(clip_frames)
    got = []
    i = 0
    while i < n:  # in chunks of any size, as frames arrive
        k = int(rng.integers(1, 10))
        part = slice(i, i + k)
        frames_ = np.zeros((len(skipped[part]), 2, 2, 3), np.uint8)
        times = np.arange(i, i + len(skipped[part]), dtype=np.float64)
        clips, _ = assembler.push(frames_, times, times + 1)
        flags = marks.push(skipped[part])
        assert len(flags) == len(clips)
        got.extend(flags)
        i += k
    last, _ = assembler.flush()
    flags = marks.flush()
    assert len(flags) == len(last)
    got.extend(flags)
    want = [skipped[c : c + clip_frames].any() for c in range(0, n, clip_frames)]
    assert got == want
