"""`vqs metrics` against the real gateway and Triton, and against a real Prometheus server that
scrapes them (Debian's `prometheus` package, started here on loopback with a generated config):
PromQL's `histogram_quantile` over the gateway's latency histogram agrees with `vqs metrics`.

Each test starts its own gateway (its own metrics registry) on the session's Triton, so the
gateway's counts are exactly the requests the test sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from server.launcher import free_port
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc

QUANTILES = (0.5, 0.95, 0.99)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def gateway_url(gateway) -> str:
    return f"http://127.0.0.1:{gateway.metrics_port}/metrics"


async def vqs_metrics(*args: str) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", "metrics", *args, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def send(gateway, videos, names: list[str]) -> list[grpc.StatusCode]:
    codes = []
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        for name in names:
            try:
                await stub.Analyze(pb.AnalyzeRequest(video=videos[name].read_bytes()), timeout=120)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
    return codes


async def test_one_shot_counts_percentiles_errors_and_triton_models(start_gateway, triton, videos):
    gateway = await start_gateway()
    try:
        codes = await send(gateway, videos, ["short", "corrupt", "normal"])
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK]
        view = await vqs_metrics("--gateway", gateway_url(gateway), "--triton", triton.metrics_url)
    finally:
        await gateway.stop()
    analyze = view["gateway"]["rpcs"]["Analyze"]
    assert analyze["count"] == 3 and analyze["errors"] == 1
    assert analyze["error_rate"] == pytest.approx(1 / 3)
    assert view["gateway"]["errors_by_code"] == {"INVALID_ARGUMENT": 1}
    assert 0 < analyze["p50_s"] <= analyze["p95_s"] <= analyze["p99_s"] <= 600
    assert analyze["per_s"] > 0
    assert {"decode", "encode", "query_decoder"} <= set(view["gateway"]["stages"])
    assert view["gateway"]["video_seconds_per_s"] > 0
    models = view["triton"]["models"]
    assert {"clip_encoder_s3d", "tqn_decoder"} <= set(models)
    for row in models.values():
        assert row["requests"] > 0 and row["mean_request_ms"] > 0
        assert row["mean_compute_ms"] <= row["mean_request_ms"]


async def test_watch_intervals_count_exactly_the_requests_sent_meanwhile(start_gateway, triton, videos):
    """Each --watch line covers one interval: summed over the intervals after the first scrape,
    the gateway saw exactly the 3 requests and Triton's decoder exactly the 2 good ones."""
    gateway = await start_gateway()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", "metrics", "--gateway", gateway_url(gateway),
        "--triton", triton.metrics_url, "--watch", "1", "--count", "200", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        assert first["one_shot"]
        assert await send(gateway, videos, ["short", "corrupt", "short"]) == [
            grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK]
        done_at = time.time()
        intervals = []
        # Lines printed while the requests ran wait in the pipe; read up to one whose scrape
        # surely came after the last request ended.
        while not intervals or intervals[-1]["at"] < done_at + 2:
            intervals.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)))
    finally:
        proc.kill()
        await proc.wait()
        await gateway.stop()
    assert all(not v["one_shot"] and 0.5 < v["gateway"]["interval_s"] < 30 for v in intervals)
    gateway_total = sum(v["gateway"]["rpcs"].get("Analyze", {}).get("count", 0) for v in intervals)
    decoder_total = sum(v["triton"]["models"]["tqn_decoder"]["requests"] for v in intervals)
    errors = sum(v["gateway"]["rpcs"].get("Analyze", {}).get("errors", 0) for v in intervals)
    assert (gateway_total, errors, decoder_total) == (3, 1, 2)


# --- a real Prometheus --------------------------------------------------------------------------

def prometheus_binary() -> str:
    """Debian's prometheus; installed here when missing and we may (CI runs as root)."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
                       check=True, env=env, timeout=600)
        found = shutil.which("prometheus")
    if not found:
        pytest.fail("this test needs Debian's `prometheus` package: apt-get install prometheus",
                    pytrace=False)
    return found


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    metrics_path: {urllib.parse.urlparse(url).path}\n"
            f"    static_configs:\n      - targets: ['{urllib.parse.urlparse(url).netloc}']\n"
            for job, url in targets.items()
        )
        config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}")
        self.log = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT,
        )

    def query(self, promql: str) -> list[dict]:
        body = http_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def until(check, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await asyncio.to_thread(check)
            if value:
                return value
        except OSError:
            pass
        await asyncio.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def bucket_width(value: float) -> float:
    bounds = (0.0, *LATENCY_BUCKETS)
    for lo, hi in zip(bounds, bounds[1:]):
        if value <= hi:
            return hi - lo
    return float("inf")


async def test_prometheus_histogram_quantile_agrees_with_vqs_metrics(
    start_gateway, triton, videos, tmp_path, show_log_on_failure
):
    gateway = await start_gateway()
    prometheus = Prometheus(tmp_path, {"vqs_gateway": gateway_url(gateway), "triton": triton.metrics_url})
    show_log_on_failure("prometheus log", prometheus.log)
    names = ["short", "mpeg4", "normal", "short", "corrupt", "normal"]
    try:
        await until(lambda: urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=5).status == 200,
                    "Prometheus ready")
        codes = await send(gateway, videos, names)
        assert codes.count(grpc.StatusCode.OK) == 5
        # Prometheus has scraped both servers after the last request.
        await until(lambda: prometheus.scalar(
            'sum(vqs_request_duration_seconds_count{rpc="Analyze"})') == len(names), "the scrape of 6 requests")
        await until(lambda: prometheus.scalar('sum(up)') == 2, "both targets up")
        ours = await vqs_metrics("--gateway", gateway_url(gateway), "--triton", triton.metrics_url)
        theirs = {}
        for q in QUANTILES:
            theirs[q] = await asyncio.to_thread(prometheus.scalar, (
                f'histogram_quantile({q}, sum by (le) (vqs_request_duration_seconds_bucket{{rpc="Analyze"}}))'))
            stage = await asyncio.to_thread(prometheus.scalar, (
                f'histogram_quantile({q}, sum by (le) (vqs_stage_duration_seconds_bucket{{stage="decode"}}))'))
            assert ours["gateway"]["stages"]["decode"][f"p{round(q * 100)}_s"] == pytest.approx(stage, rel=1e-9)
        decoder_requests = await asyncio.to_thread(
            prometheus.scalar, 'sum(nv_inference_request_success{model="tqn_decoder"})')
    finally:
        prometheus.stop()
        await gateway.stop()
    analyze = ours["gateway"]["rpcs"]["Analyze"]
    assert analyze["count"] == len(names)
    for q in QUANTILES:
        mine = analyze[f"p{round(q * 100)}_s"]
        # The bar is agreement within the bucket resolution; both compute the same
        # interpolation over the same buckets, so they agree to float precision.
        assert abs(mine - theirs[q]) <= bucket_width(theirs[q]), (q, mine, theirs[q])
        assert mine == pytest.approx(theirs[q], rel=1e-9), (q, mine, theirs[q])
    # Prometheus scraped Triton too: the session's decoder counts as vqs metrics read them.
    assert decoder_requests == ours["triton"]["models"]["tqn_decoder"]["requests"]
