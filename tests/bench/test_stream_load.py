"""Streams under load (slow, bounded: it stops by itself in about 4 minutes): real-time 320x240
MPEG-TS streams into one fresh gateway process, first a ramp (1, 4, 8, 16 streams for 20 s each)
to see how many this machine holds before the event latency passes 1 s, then 16 streams for 60 s
with `Analyze` requests on top and one stream beyond the limit.

Prints, per ramp level and for the 60 s run: event latency p50/p95/p99 (last frame of a window
sent -> its event received, over the windows with answers: realtime mode may drop every clip of
a window), clips dropped, errors by gRPC code, the gateway's process-tree peak
RSS and the CPU-seconds of the gateway, its decode workers and Triton. Asserts what does not
depend on the machine's speed: the only errors are RESOURCE_EXHAUSTED for calls beyond the
configured limits, every stream ends with its final event, and the gateway's memory is bounded
(its peak is not growing with the streams' length: checked against the ramp's 16-stream level).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.proto import video_analytics_pb2 as pb
from tests.bench.conftest import gateway_subprocess
from tests.bench.harness import RssSampler, analyze, cpu_roles
from tests.bench.test_stream_latency import HOP, WINDOW, live_ts, realtime_stream

pytestmark = pytest.mark.slow

STREAMS = 16
RAMP = (1, 4, 8, 16)
RAMP_S = 20
LOAD_S = 60
TARGET_S = 1.0
UNARY_RETRY_S = 0.5


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    server_lags: list[float] = field(default_factory=list)  # lag_s the gateway put in the event
    dropped: int = 0
    clips: int = 0
    unanswered: int = 0  # windows all of whose clips were dropped
    finals: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stream(self, address: str, path: Path) -> None:
        options = pb.StreamOptions(window_clips=WINDOW, hop_clips=HOP, mode=pb.STREAM_MODE_REALTIME)
        try:
            events, log = realtime_stream(address, path, options)
        except grpc.RpcError as exc:
            with self.lock:
                self.errors[exc.code().name] += 1
            return
        with self.lock:
            for event, at in events:
                if event.kind == pb.StreamEvent.WINDOW:
                    sent = log.sent_at(event.end_s)
                    if not event.HasField("result"):
                        self.unanswered += 1
                    elif sent is not None:
                        self.latencies.append(at - sent)
                        self.server_lags.append(event.lag_s)
                elif event.kind == pb.StreamEvent.FINAL:
                    self.finals += 1
                    self.dropped += event.dropped_clips_total
                    self.clips += event.clips_decoded

    def summary(self) -> str:
        if not self.latencies:
            return f"no windows; errors {dict(self.errors)}"
        p50, p95, p99 = np.percentile(self.latencies, [50, 95, 99])
        # The gateway's own lag_s (event sent - first byte's arrival - window end): the part of
        # the latency before the event left the gateway.
        lag50, lag95 = np.percentile(self.server_lags, [50, 95])
        return (f"latency p50 {p50:.3f} s, p95 {p95:.3f} s, p99 {p99:.3f} s (gateway lag_s p50 "
                f"{lag50:.3f}, p95 {lag95:.3f}) over {len(self.latencies)} "
                f"windows with answers ({self.unanswered} without); dropped clips {self.dropped} of "
                f"{self.clips}; errors {dict(self.errors) or 'none'}")


def concurrently(jobs) -> None:
    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_sixteen_realtime_streams_with_unary_requests_on_top(triton, allowed_root, tmp_path, videos, monkeypatch):
    ramp_ts, load_ts = live_ts(tmp_path / "ramp.ts", RAMP_S), live_ts(tmp_path / "load.ts", LOAD_S)
    monkeypatch.setenv("VQS_LIMITS__MAX_CONCURRENT_STREAMS", str(STREAMS))
    monkeypatch.setenv("VQS_LIMITS__MAX_CONCURRENT_REQUESTS", "2")
    # A worker per stream and two for Analyze.
    monkeypatch.setenv("VQS_DECODE__WORKERS", str(STREAMS + 2))
    with gateway_subprocess(triton.grpc_url, triton.model_repository, allowed_root,
                            tmp_path / "gateway.log") as (proc, address):
        sampler = RssSampler(proc.pid)
        sampler.start()
        ramp: dict[int, Run] = {}
        ramp_peak: dict[int, float] = {}
        for n in RAMP:
            ramp[n] = Run()
            concurrently([lambda: ramp[n].stream(address, ramp_ts)] * n)
            ramp_peak[n] = sampler.peak_total
            print(f"\n{n:>2} real-time streams x {RAMP_S} s: {ramp[n].summary()}")

        load, unary = Run(), collections.Counter()
        stop = threading.Event()
        upload = videos["normal"].read_bytes()
        beyond: list[str] = []

        def unary_loop() -> None:
            while not stop.is_set():
                try:
                    analyze(address, pb.AnalyzeRequest(video=upload))
                    unary["OK"] += 1
                except grpc.RpcError as exc:
                    unary[exc.code().name] += 1
                    stop.wait(UNARY_RETRY_S)  # as a client told to retry later would

        def one_more_stream() -> None:
            time.sleep(5.0)  # all 16 admitted by then
            try:
                realtime_stream(address, ramp_ts, pb.StreamOptions())
                beyond.append("OK")
            except grpc.RpcError as exc:
                beyond.append(exc.code().name)

        before = cpu_roles(gateway=proc.pid, triton=triton.pid)
        started = time.perf_counter()
        unary_threads = [threading.Thread(target=unary_loop) for _ in range(3)]  # one more than allowed
        for t in unary_threads:
            t.start()
        concurrently([lambda: load.stream(address, load_ts)] * STREAMS + [one_more_stream])
        stop.set()
        for t in unary_threads:
            t.join()
        wall = time.perf_counter() - started
        after = cpu_roles(gateway=proc.pid, triton=triton.pid)
        sampler.stop()

    cpu = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) >= 0.05}
    print(f"{STREAMS} real-time streams x {LOAD_S} s + Analyze requests (3 clients, limit 2): {load.summary()}")
    print(f"Analyze requests: {dict(unary)}; a 17th stream: {beyond}")
    print(f"gateway process tree peak RSS {sampler.peak_total:.0f} MB (16-stream ramp level: "
          f"{ramp_peak[16]:.0f} MB); CPU-s over {wall:.0f} s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items()))
          + f" = {sum(cpu.values()) / wall:.2f} cores")
    held = [n for n in RAMP if ramp[n].latencies and np.percentile(ramp[n].latencies, 95) <= TARGET_S
            and not ramp[n].errors]
    print(f"streams held with event p95 <= {TARGET_S:g} s: {max(held) if held else 0} (of levels {RAMP})")

    assert load.finals == STREAMS and set(load.errors) == set()
    assert beyond == ["RESOURCE_EXHAUSTED"]
    assert set(unary) <= {"OK", "RESOURCE_EXHAUSTED"} and unary["OK"] > 0
    for n in RAMP:
        assert ramp[n].finals == n and not ramp[n].errors
    # Memory bounded: a stream three times longer does not take the tree's peak much higher.
    assert sampler.peak_total <= 1.5 * ramp_peak[16] + 300
