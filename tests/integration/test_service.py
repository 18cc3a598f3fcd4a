"""DescribeModels, health, reflection, metrics, upload limits."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.settings import Settings
from tests.vocabulary import query_specs

pytestmark = pytest.mark.integration


async def test_describe_models_lists_queries_and_attributes(stub, model_repository):
    response = await stub.DescribeModels(pb.DescribeModelsRequest())

    # What Triton serves (the query decoder's config), in its output order.
    assert [(q.query, tuple(q.attributes)) for q in response.queries] == [
        (q.query, q.attributes) for q in query_specs(model_repository)
    ]
    assert "s3d" in response.encoders
    assert response.default_encoder == "s3d"
    assert (response.clip_frames, response.frame_size) == (8, 112)
    assert response.clip_fps == 15.0  # from the encoder's Triton config
    assert response.max_upload_bytes > 0


async def test_a_gateway_of_a_remote_triton_needs_no_model_repository(triton, tmp_path,
                                                                      model_repository):
    """The queries, attributes and clip settings come from Triton, not from files on the disk."""
    from server.main import Gateway

    remote = Settings().triton.model_copy(
        update={"url": triton.grpc_url, "model_repository": tmp_path / "not-here"}
    )
    gateway = Gateway(Settings().model_copy(
        update={"grpc_port": 0, "metrics_port": 0, "triton": remote}
    ))
    try:
        await gateway.start()
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            response = await pb_grpc.VideoAnalyticsStub(channel).DescribeModels(
                pb.DescribeModelsRequest()
            )
    finally:
        await gateway.stop()
    assert [q.query for q in response.queries] == [q.query for q in query_specs(model_repository)]
    assert response.clip_fps == 15.0


async def test_a_malformed_request_body_is_invalid_argument_with_a_request_id(channel):
    analyze = channel.unary_unary("/vqs.v1.VideoAnalytics/Analyze")  # raw bytes in and out
    call = analyze(b"\xff\xff\xff\xff", metadata=(("x-request-id", "bad-body"),))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(await call.trailing_metadata())["x-request-id"] == "bad-body"


async def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "vqs.v1.VideoAnalytics"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def one_request():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    services = []
    async for response in reflection.ServerReflectionInfo(one_request()):
        services += [s.name for s in response.list_services_response.service]
    assert "vqs.v1.VideoAnalytics" in services
    assert "grpc.health.v1.Health" in services


async def test_metrics_endpoint_exposes_the_counters(stub, gateway, videos):
    await stub.Analyze(pb.AnalyzeRequest(video=videos["short"].read_bytes()), timeout=120)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Analyze(pb.AnalyzeRequest(video=b""))

    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for name in (
        'vqs_request_duration_seconds_count{encoder="s3d",rpc="Analyze",status="OK"}',
        'vqs_stage_duration_seconds_count{stage="encode"}',
        'vqs_stage_duration_seconds_count{stage="decode"}',
        'vqs_stage_duration_seconds_count{stage="query_decoder"}',
        "vqs_clips_total",
        "vqs_video_seconds_total",
        "vqs_inflight_requests",
        'vqs_errors_total{code="INVALID_ARGUMENT"}',
    ):
        assert name in text, name
    clips = next(line for line in text.splitlines() if line.startswith("vqs_clips_total"))
    assert float(clips.split()[-1]) >= 1


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def small_gateway(start_gateway):
    limits = Settings().limits.model_copy(update={"max_upload_bytes": 64 * 1024})
    gateway = await start_gateway(limits=limits)
    yield gateway
    await gateway.stop()


async def test_upload_above_the_limit_names_the_limit(small_gateway):
    async with grpc.aio.insecure_channel(small_gateway.address) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Analyze(pb.AnalyzeRequest(video=b"\0" * (64 * 1024 + 1)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "65536" in error.value.details()
        assert "max_upload_bytes" in error.value.details()

        # Far above the limit gRPC itself refuses the message, with the same status.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Analyze(pb.AnalyzeRequest(video=b"\0" * (3 * 1024 * 1024)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_health_is_not_serving_until_triton_is_ready(trained_models):
    from server.errors import BackendUnavailable
    from server.launcher import free_port
    from server.main import Gateway

    settings = Settings().model_copy(update={
        "grpc_port": 0,
        "metrics_port": 0,
        "triton": Settings().triton.model_copy(
            update={
                "url": f"127.0.0.1:{free_port()}",  # nothing listens there
                "model_repository": trained_models,
                "startup_timeout_s": 3.0,
            }
        ),
    })
    gateway = Gateway(settings)
    starting = asyncio.create_task(gateway.start())
    try:
        while gateway.port is None and not starting.done():
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = await health.Check(
                health_pb2.HealthCheckRequest(service=""), wait_for_ready=True, timeout=2
            )
            assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(BackendUnavailable, match="not ready"):
            await starting
    finally:
        await gateway.stop()
