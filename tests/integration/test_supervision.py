"""The gateway restarts the Triton it launched: SIGKILL it, watch health and the metrics.

Each test has its own gateway and Triton (they get killed) over its own copy of the model
repository (a test breaks a model in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import urllib.request
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from clients.cli import app
from server.main import SERVICE_NAME, Gateway
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc
from tests.gateways import own_triton_settings
from tests.vocabulary import query_names

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A safety limit so a broken supervisor fails the test instead of hanging it; no timing is asserted.
RECOVERY_TIMEOUT_S = 120.0


@pytest.fixture
def repository(trained_models: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model_repository"
    shutil.copytree(
        trained_models, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pt")
    )
    return copy


# A Triton not ready for this long counts as hung here (the default is 120 s).
HUNG_RESTART_S = 5.0
# Restart backoff here: 0.5, 1, 2, ... s (the default is 1, 2, 4, ... 30 s).
BACKOFF_S = 0.5


@pytest_asyncio.fixture(loop_scope="session")
async def supervised(repository: Path, tmp_path: Path, gateway_log, show_log_on_failure):
    """A started gateway that launched its own Triton."""
    triton_log = tmp_path / "tritonserver.log"
    show_log_on_failure("supervised tritonserver log", triton_log)
    settings = own_triton_settings(repository, hung_restart_s=HUNG_RESTART_S, restart_backoff_s=BACKOFF_S)
    gateway = Gateway(settings, triton_log=triton_log)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop()


async def until(predicate, what: str) -> None:
    try:
        async with asyncio.timeout(RECOVERY_TIMEOUT_S):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"waited {RECOVERY_TIMEOUT_S:.0f} s for {what}") from None


async def wait_for_status(watch, wanted) -> None:
    """Read the health Watch stream until it reports `wanted`."""
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)
    try:
        async with asyncio.timeout(RECOVERY_TIMEOUT_S):
            while (response := await watch.read()) != grpc.aio.EOF:
                if response.status == wanted:
                    return
    except TimeoutError:
        raise AssertionError(f"health not {name} after {RECOVERY_TIMEOUT_S:.0f} s") from None
    raise AssertionError(f"the health stream ended before {name}")


def restarts(gateway: Gateway) -> float:
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    line = next(l for l in text.splitlines() if l.startswith("vqs_triton_restarts_total "))
    return float(line.split()[-1])


def is_tritonserver(pid: int) -> bool:
    try:
        return b"tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def process_group(pgid: int) -> list[int]:
    """Live processes in the process group `pgid` (a tritonserver's: itself and its model stubs)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


async def check_health(channel) -> int:
    health = health_pb2_grpc.HealthStub(channel)
    return (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))).status


async def test_killed_triton_is_restarted_on_the_same_ports(supervised, videos):
    process = supervised.triton_process
    url, first_pid = process.grpc_url, process.pid
    assert restarts(supervised) == 0
    async with grpc.aio.insecure_channel(supervised.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        await wait_for_status(watch, SERVING)

        os.kill(first_pid, signal.SIGKILL)
        await until(lambda: not is_tritonserver(first_pid), "tritonserver to die")
        # Whether or not the gateway has noticed yet: UNAVAILABLE, saying what is down.
        stub = pb_grpc.VideoAnalyticsStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Analyze(pb.AnalyzeRequest(video=videos["short"].read_bytes()), timeout=60)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Triton is" in error.value.details()
        await wait_for_status(watch, NOT_SERVING)
        await wait_for_status(watch, SERVING)
        watch.cancel()

        assert process.pid != first_pid and is_tritonserver(process.pid)
        assert process_group(first_pid) == []  # the killed server's model stubs went with it
        assert process.grpc_url == url
        assert restarts(supervised) >= 1
        response = await stub.Analyze(pb.AnalyzeRequest(video=videos["normal"].read_bytes()), timeout=120)
        assert [a.query for a in response.answers] == query_names(supervised.settings.triton.model_repository)
        assert response.video.clips >= 2


async def test_a_hung_triton_is_restarted(supervised, videos, caplog):
    process = supervised.triton_process
    hung_pid = process.pid
    os.kill(hung_pid, signal.SIGSTOP)  # alive, listening, answering nothing
    try:
        async with grpc.aio.insecure_channel(supervised.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
            await wait_for_status(watch, NOT_SERVING)
            await wait_for_status(watch, SERVING)
            watch.cancel()
            assert any("has not been ready" in r.getMessage() for r in caplog.records)
            assert process.pid != hung_pid and not is_tritonserver(hung_pid)
            assert process_group(hung_pid) == []
            assert restarts(supervised) == 1
            stub = pb_grpc.VideoAnalyticsStub(channel)
            response = await stub.Analyze(pb.AnalyzeRequest(video=videos["short"].read_bytes()), timeout=120)
            assert len(response.answers) == len(query_names(supervised.settings.triton.model_repository))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung_pid, signal.SIGCONT)


async def test_a_model_failing_on_restart_keeps_the_gateway_up_and_not_serving(
    supervised, repository, videos, caplog
):
    onnx = repository / "tqn_decoder" / "1" / "model.onnx"
    good = onnx.read_bytes()
    onnx.write_bytes(b"this is not an onnx file")
    os.kill(supervised.triton_process.pid, signal.SIGKILL)

    def load_error_logged() -> bool:
        return any(
            "restart failed" in r.getMessage() and "tqn_decoder" in r.getMessage()
            and "Protobuf parsing failed" in r.getMessage()
            for r in caplog.records
        )

    await until(load_error_logged, "the decoder's load error in the gateway log")
    async with grpc.aio.insecure_channel(supervised.address) as channel:
        assert await check_health(channel) == NOT_SERVING
        stub = pb_grpc.VideoAnalyticsStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Analyze(pb.AnalyzeRequest(video=videos["short"].read_bytes()), timeout=60)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Triton is restarting" in error.value.details()
        # The CLI tells this apart from an unreachable gateway: exit 1 with the reason, not 4.
        cli = await asyncio.to_thread(
            CliRunner().invoke, app,
            ["analyze", str(videos["short"]), "--server", supervised.address, "--timeout", "60"],
        )
        assert cli.exit_code == 1, cli.output
        assert "UNAVAILABLE: Triton is restarting" in cli.output
        assert "is the gateway running" not in cli.output

        onnx.write_bytes(good)  # the next attempt (after its backoff) loads it
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        await wait_for_status(watch, SERVING)
        watch.cancel()
        assert restarts(supervised) >= 2  # the failed attempt and the good one
        delays = [r.args[1] for r in caplog.records if "starting it again" in r.getMessage()]
        assert delays[:2] == [BACKOFF_S, 2 * BACKOFF_S]  # the configured backoff, doubling
        response = await stub.Analyze(pb.AnalyzeRequest(video=videos["short"].read_bytes()), timeout=120)
        assert len(response.answers) == len(query_names(supervised.settings.triton.model_repository))


async def test_stop_during_a_restart_leaves_no_tritonserver(supervised):
    process = supervised.triton_process
    first_pid = process.pid
    os.kill(first_pid, signal.SIGKILL)
    await until(lambda: process.pid not in (None, first_pid), "the restarted tritonserver")
    second_pid = process.pid  # started, still loading its models

    await supervised.stop()

    assert not is_tritonserver(first_pid)
    assert not is_tritonserver(second_pid)
    # Nor any of their model stubs (they outlive a server killed while it loads models).
    assert process_group(first_pid) == process_group(second_pid) == []
    assert process.pid is None
