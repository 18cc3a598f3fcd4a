"""Run `vqs serve` as a user would (a command in another environment) and talk to it over gRPC.

`served_gateway(command, env=..., port=...)` starts the command in its own process group, waits
for a SERVING health check and stops the whole group afterwards; its output is attached to the
report of a failing test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
# Safety limits so a broken start fails the test instead of hanging it; no timing is asserted.
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def _clean_environment(path: Path | None = None, **variables: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VQS_", "PYTHON", "VIRTUAL_ENV"))
    }
    if path is not None:
        env["PATH"] = os.pathsep.join([str(path), env.get("PATH", "")])
    env.update(variables)
    return env


@pytest.fixture
def clean_environment() -> Callable[..., dict[str, str]]:
    """`clean_environment(path=, **variables)`: this environment without Python or vqs settings
    that would leak into a command, `path` first on PATH, plus the given variables."""
    return _clean_environment


class ServedGateway:
    def __init__(self, process: subprocess.Popen, address: str, log: Path):
        self.process = process
        self.address = address
        self.log = log

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds until the health check said SERVING; fails if the command exits first."""
        start = time.monotonic()
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - start < timeout_s:
                if self.process.poll() is not None:
                    pytest.fail(f"`vqs serve` exited with {self.process.returncode} before serving")
                with contextlib.suppress(grpc.RpcError):
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                        return time.monotonic() - start
                time.sleep(0.5)
        pytest.fail(f"no SERVING health check from {self.address} within {timeout_s:.0f} s")

    def analyze(self, video: Path) -> pb.AnalyzeResponse:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.VideoAnalyticsStub(channel)
            return stub.Analyze(pb.AnalyzeRequest(video=video.read_bytes()), timeout=120)

    def stop(self) -> int | None:
        """SIGTERM the process group (the gateway, its Triton and workers); SIGKILL if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Anything left in its process group after a grace period outlived the gateway.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _group_alive(self.process.pid):
            if time.monotonic() > deadline:
                os.killpg(self.process.pid, signal.SIGKILL)
                pytest.fail("processes started by `vqs serve` outlived it")
            time.sleep(0.2)
        return self.process.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def served_gateway(tmp_path: Path, show_log_on_failure) -> Iterator[Callable[..., ServedGateway]]:
    """`served_gateway(command, env=, port=, cwd=)` -> a running `ServedGateway` (stopped after)."""
    started: list[ServedGateway] = []

    def start(command: list[str], *, env: dict[str, str], port: int, cwd: Path) -> ServedGateway:
        log = tmp_path / f"serve-{len(started)}.log"
        command = [str(part) for part in command]
        show_log_on_failure(f"`{' '.join(command[-2:])}` output", log)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        gateway = ServedGateway(process, f"127.0.0.1:{port}", log)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
