"""TLS, mutual TLS and the bearer token through real gateways (the session's Triton), with
certificates made by `openssl` at test time; the clients (`vqs analyze`, `vqs score`) run as
separate processes with --tls-ca / --token / VQS_TOKEN; `vqs serve` refuses unsafe settings with
one line naming the setting."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from clients import channel as client_channel
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from server.settings import SecuritySettings
from tests.certificates import Pki, make_pki

pytestmark = pytest.mark.integration

TOKEN = "integration-token-7f3a"
WAIT_S = 60.0
SERVICE = "vqs.v1.VideoAnalytics"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_gateway(start_gateway, pki, allowed_root):
    """TLS with the test CA's server certificate, and a token."""
    gateway = await start_gateway(security=SecuritySettings(
        allowed_root=allowed_root, tls_cert=pki.server_cert, tls_key=pki.server_key,
        token=SecretStr(TOKEN)))
    yield gateway
    await gateway.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mtls_gateway(start_gateway, pki, allowed_root):
    """Mutual TLS: clients must show a certificate the test CA signed; no token."""
    gateway = await start_gateway(security=SecuritySettings(
        allowed_root=allowed_root, tls_cert=pki.server_cert, tls_key=pki.server_key,
        tls_client_ca=pki.ca))
    yield gateway
    await gateway.stop()


def connect(gateway, pki: Pki | None, *, token: str | None = None, client_cert: bool = False):
    config = client_channel.config_from_options(
        gateway.address, tls_ca=pki.ca if pki else None, token=token,
        tls_cert=pki.client_cert if client_cert else None, tls_key=pki.client_key if client_cert else None)
    return client_channel.open_aio_channel(config, options=[("grpc.max_send_message_length", 64 << 20)])


async def test_tls_with_the_token_answers(tls_gateway, pki, videos, queries):
    async with connect(tls_gateway, pki, token=TOKEN) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        models = await stub.DescribeModels(pb.DescribeModelsRequest(), timeout=WAIT_S)
        reply = await stub.Analyze(pb.AnalyzeRequest(video=videos["normal"].read_bytes()), timeout=WAIT_S)
    assert [q.query for q in models.queries] == queries
    assert [a.query for a in reply.answers] == queries
    for attention in reply.attention:
        assert sum(attention.weights) == pytest.approx(1.0, abs=1e-3)
    assert reply.request_id


@pytest.mark.parametrize("token, expected", [(None, "missing bearer token"), ("wrong", "invalid bearer token")])
async def test_a_missing_or_wrong_token_is_unauthenticated_and_health_stays_open(
    tls_gateway, pki, videos, token, expected,
):
    refused = tls_gateway.metrics.errors.labels(code="UNAUTHENTICATED")._value.get()
    async with connect(tls_gateway, pki, token=token) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        calls = (stub.Analyze(pb.AnalyzeRequest(video=videos["normal"].read_bytes()), timeout=WAIT_S),
                 stub.DescribeModels(pb.DescribeModelsRequest(), timeout=WAIT_S))
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert expected in error.value.details()
            assert TOKEN not in error.value.details() and "wrong" not in error.value.details()
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=WAIT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    def reflection_refused() -> grpc.RpcError:
        # Reflection describes the API: protected like it. A streaming call through the blocking
        # API (see test_streams_need_the_token_too).
        config = client_channel.config_from_options(tls_gateway.address, tls_ca=pki.ca, token=token)
        with client_channel.open_channel(config) as channel:
            with pytest.raises(grpc.RpcError) as error:
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT_S))
        return error.value

    error = await asyncio.to_thread(reflection_refused)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and expected in error.details()
    # Counted as each handler ends, which can be just after its caller got the status.
    counted = tls_gateway.metrics.errors.labels(code="UNAUTHENTICATED")
    for _ in range(50):
        if counted._value.get() >= refused + 3:
            break
        await asyncio.sleep(0.1)
    assert counted._value.get() == refused + 3


async def test_reflection_lists_the_service_with_the_token(tls_gateway, pki):
    async with connect(tls_gateway, pki, token=TOKEN) as channel:
        replies = [r async for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT_S)]
    assert SERVICE in [s.name for s in replies[0].list_services_response.service]


async def test_plaintext_or_an_untrusted_ca_does_not_connect(tls_gateway, pki):
    async with connect(tls_gateway, None, token=TOKEN) as channel:  # plaintext to a TLS port
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await pb_grpc.VideoAnalyticsStub(channel).DescribeModels(pb.DescribeModelsRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    config = client_channel.config_from_options(tls_gateway.address, tls_ca=pki.other_ca, token=TOKEN)
    async with client_channel.open_aio_channel(config) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await pb_grpc.VideoAnalyticsStub(channel).DescribeModels(pb.DescribeModelsRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_gateway, pki, videos, queries):
    async with connect(mtls_gateway, pki) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await pb_grpc.VideoAnalyticsStub(channel).DescribeModels(pb.DescribeModelsRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    async with connect(mtls_gateway, pki, client_cert=True) as channel:
        reply = await pb_grpc.VideoAnalyticsStub(channel).Analyze(
            pb.AnalyzeRequest(video=videos["short"].read_bytes()), timeout=WAIT_S)
    assert [a.query for a in reply.answers] == queries


def _stream_requests(data: bytes, chunk: int = 64 * 1024):
    yield pb.StreamRequest(options=pb.StreamOptions())
    for start in range(0, len(data), chunk):
        yield pb.StreamRequest(chunk=data[start:start + chunk])


async def _aio_requests(data: bytes):
    for request in _stream_requests(data):
        yield request


async def test_streams_need_the_token_too(tls_gateway, pki, videos, tmp_path, queries):
    from tests.media import ffmpeg

    ts = tmp_path / "stream.ts"
    ffmpeg("-i", str(videos["normal"]), "-c", "copy", "-f", "mpegts", str(ts))
    data = ts.read_bytes()

    def refused_stream() -> grpc.RpcError:
        # The blocking API: an asyncio client still writing when the server ends the call may
        # report INTERNAL instead of the server's status (grpc/grpc#36066).
        config = client_channel.config_from_options(tls_gateway.address, tls_ca=pki.ca, token="wrong")
        with client_channel.open_channel(config) as channel:
            with pytest.raises(grpc.RpcError) as error:
                list(pb_grpc.VideoAnalyticsStub(channel).AnalyzeStream(_stream_requests(data), timeout=WAIT_S))
        return error.value

    error = await asyncio.to_thread(refused_stream)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid bearer token" in error.details()
    async with connect(tls_gateway, pki, token=TOKEN) as channel:
        call = pb_grpc.VideoAnalyticsStub(channel).AnalyzeStream(_aio_requests(data), timeout=WAIT_S)
        events = [event async for event in call]
    assert events[-1].kind == pb.StreamEvent.FINAL
    assert [a.query for a in events[-1].result.answers] == queries


# -- the command-line clients, as separate processes ----------------------------------------------


async def vqs(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VQS_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from clients.cli import app; app()", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**environment, "COLUMNS": "200", **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_vqs_analyze_with_tls_ca_and_token(tls_gateway, pki, videos, queries):
    video = str(videos["normal"])
    server = ("--server", tls_gateway.address, "--tls-ca", str(pki.ca))
    code, out, err = await vqs("analyze", video, *server, "--json", env={"VQS_TOKEN": TOKEN})
    assert code == 0, err
    assert [a["query"] for a in json.loads(out)["answers"]] == queries
    code, out, err = await vqs("analyze", video, *server, "--json", "--token", TOKEN)
    assert code == 0, err
    code, out, err = await vqs("analyze", video, *server, "--json")
    assert code == 1 and out == ""
    assert "UNAUTHENTICATED: missing bearer token" in err


async def test_vqs_analyze_with_a_client_certificate(mtls_gateway, pki, videos):
    code, out, err = await vqs(
        "analyze", str(videos["short"]), "--server", mtls_gateway.address, "--json",
        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    assert code == 0, err
    assert json.loads(out)["answers"]
    code, _, err = await vqs(
        "analyze", str(videos["short"]), "--server", mtls_gateway.address, "--tls-ca", str(pki.ca))
    assert code == 4  # the handshake fails: no gateway answered
    assert "--tls-ca trusts" in err


async def test_vqs_stream_with_tls_ca_and_token(tls_gateway, pki, videos, tmp_path, queries):
    from tests.media import ffmpeg

    ts = tmp_path / "cli.ts"
    ffmpeg("-i", str(videos["normal"]), "-c", "copy", "-f", "mpegts", str(ts))
    server = ("--server", tls_gateway.address, "--tls-ca", str(pki.ca))
    code, out, err = await vqs("stream", str(ts), *server, "--json", "--mode", "archive",
                               env={"VQS_TOKEN": TOKEN})
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["kind"] == "final" and any(e["kind"] == "window" for e in events)
    assert [a["query"] for a in events[-1]["answers"]] == queries
    code, out, err = await vqs("stream", str(ts), *server, "--json", env={"VQS_TOKEN": "wrong"})
    assert code == 1 and "UNAUTHENTICATED" in err


async def test_vqs_score_with_tls_ca_and_token(tls_gateway, pki, videos, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("normal", "short"):
        shutil.copy(videos[name], folder / f"{name}.mp4")
    out = tmp_path / "results.jsonl"
    code, _, err = await vqs("score", str(folder), "--out", str(out), "--server", tls_gateway.address,
                             "--tls-ca", str(pki.ca), "--workers", "2", env={"VQS_TOKEN": TOKEN})
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["normal.mp4", "short.mp4"]
    assert all("result" in r for r in rows)
    code, _, err = await vqs("score", str(folder), "--out", str(tmp_path / "refused.jsonl"),
                             "--server", tls_gateway.address, "--tls-ca", str(pki.ca),
                             env={"VQS_TOKEN": "wrong"})
    assert code == 1 and "refused the call (UNAUTHENTICATED: invalid bearer token)" in err


# -- vqs serve refuses unsafe settings before starting anything -----------------------------------


@pytest.mark.parametrize("variables, expected", [
    ({"VQS_HOST": "0.0.0.0"}, "refusing to listen on 0.0.0.0, beyond loopback, without TLS"),
    ({"VQS_SECURITY__TLS_CERT": "{server_cert}", "VQS_SECURITY__TLS_KEY": "{other_key}"},
     "security.tls_key: {other_key} is not the private key of security.tls_cert"),
    ({"VQS_SECURITY__TLS_CERT": "{server_cert}"}, "set both security.tls_cert and security.tls_key"),
])
async def test_vqs_serve_names_the_setting_in_one_line(pki, variables, expected):
    paths = {"server_cert": pki.server_cert, "other_key": pki.other_key}
    env = {k: v.format(**paths) for k, v in variables.items()}
    env.update({"VQS_GRPC_PORT": "0", "VQS_METRICS_PORT": "0", "VQS_TRITON__URL": "127.0.0.1:1"})
    code, out, err = await vqs("serve", env=env, timeout=60)
    assert code == 1
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expected.format(**paths) in errors[0], err
    assert "Traceback" not in err
