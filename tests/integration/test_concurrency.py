"""`limits.max_concurrent_requests` through a full server: a request beyond it is refused, not queued."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.main import SERVICE_NAME
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.settings import Settings
from tests.media import LONG_VIDEO_S

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def one_slot_gateway(start_gateway):
    limits = Settings().limits.model_copy(update={"max_concurrent_requests": 1})
    gateway = await start_gateway(limits=limits)
    yield gateway
    await gateway.stop()


def inflight(gateway) -> float:
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return float(next(l for l in text.splitlines() if l.startswith("vqs_inflight_requests ")).split()[-1])


async def test_second_request_is_refused_while_the_first_runs(
    one_slot_gateway, long_video, videos, queries
):
    async with grpc.aio.insecure_channel(one_slot_gateway.address) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        upload = long_video.read_bytes()

        def analyze() -> asyncio.Task:
            return asyncio.ensure_future(stub.Analyze(pb.AnalyzeRequest(video=upload), timeout=120))

        first = analyze()
        async with asyncio.timeout(60):  # a safety limit, not a timing
            while await asyncio.to_thread(inflight, one_slot_gateway) < 1 and not first.done():
                await asyncio.sleep(0.01)
        second = analyze()

        # The refused call ends while the other is still analysing.
        done, running = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(running) == 1
        refused, admitted = done.pop(), running.pop()
        error = refused.exception()
        assert isinstance(error, grpc.aio.AioRpcError), "both requests were admitted"
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_concurrent_requests" in error.details()

        response = await admitted
        assert [a.query for a in response.answers] == queries
        assert response.video.duration_s == pytest.approx(LONG_VIDEO_S, abs=0.5)
        assert response.video.clips == len(response.attention[0].weights) >= 100

        # The slot is free again and the server healthy.
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        again = await stub.Analyze(pb.AnalyzeRequest(video=videos["short"].read_bytes()), timeout=120)
        assert len(again.answers) == len(queries)
