"""Prometheus metrics of the gateway, in their own registry, served over HTTP on request."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "vqs_request_duration_seconds", "Gateway RPC latency.",
            ["rpc", "encoder", "status"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.stage_duration = Histogram(
            "vqs_stage_duration_seconds",
            "Time per request spent waiting on each pipeline stage.",
            ["stage"], buckets=_STAGE_BUCKETS, registry=self.registry,
        )
        self.clips = Counter("vqs_clips", "Clips encoded.", registry=self.registry)
        self.video_seconds = Counter(
            "vqs_video_seconds", "Seconds of video analysed.", registry=self.registry
        )
        self.inflight = Gauge(
            "vqs_inflight_requests", "RPCs being handled.", registry=self.registry
        )
        self.errors = Counter(
            "vqs_errors", "RPCs that ended in an error, by gRPC status.", ["code"],
            registry=self.registry,
        )
        self.triton_restarts = Counter(
            "vqs_triton_restarts", "Times the gateway started the Triton it launched again.",
            registry=self.registry,
        )
        self._init_compute_metrics()
        self._init_stream_metrics()
        self._server = None

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0 = any free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = server.server_port
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # StageObserver for the analysis pipeline.
    def stage(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(stage=stage).observe(seconds)

    def video(self, clips: int, seconds: float) -> None:
        self.clips.inc(clips)
        self.video_seconds.inc(max(seconds, 0.0))

    # -- What the encoders spent (issue 9)

    def _init_compute_metrics(self) -> None:
        # A histogram over clips, not a gauge: requests run concurrently at different budgets, so
        # a gauge would show whichever finished last; the buckets show how much adaptivity there
        # is (clips of a flight keep more than idle ones), and _sum / _count is the mean ratio.
        self.kept_ratio = Histogram(
            "vqs_adaptive_kept_ratio",
            "Per clip of an adaptive encoder: GMACs spent / GMACs of the encoder without its "
            "adaptive module.",
            ["encoder"], buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1),
            registry=self.registry,
        )
        self.encoder_gmacs = Counter(
            "vqs_encoder_gmacs",
            "GMACs (1e9 multiply-adds) the clip encoders spent, as the models counted them.",
            ["encoder"], registry=self.registry,
        )

    def compute(self, compute) -> None:
        """An `assemble.Compute`: its clips' kept ratios and GMACs."""
        ratios = compute.kept_ratios
        if ratios is not None:
            histogram = self.kept_ratio.labels(encoder=compute.encoder)
            for ratio in ratios:
                histogram.observe(float(ratio))
        if compute.gmacs is not None:
            self.encoder_gmacs.labels(encoder=compute.encoder).inc(float(compute.gmacs.sum()))

    # -- AnalyzeStream (StreamObserver)

    def _init_stream_metrics(self) -> None:
        self.stream_lag = Histogram(
            "vqs_stream_lag_seconds",
            "How long after its end was live each stream window's event went out.",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=self.registry,
        )
        self.stream_dropped_clips = Counter(
            "vqs_stream_dropped_clips",
            "Clips of realtime streams dropped unanalysed because the analysis was behind.",
            registry=self.registry,
        )
        self.stalled_streams = Counter(
            "vqs_stream_stalled",
            "Streams ended because their client sent nothing for limits.stream_idle_s.",
            registry=self.registry,
        )

    def stream_window(self, lag_s: float, dropped_clips: int) -> None:
        self.stream_lag.observe(max(lag_s, 0.0))
        if dropped_clips:
            self.stream_dropped_clips.inc(dropped_clips)

    def stream_stalled(self) -> None:
        self.stalled_streams.inc()
