"""Run `vqs serve` as a user would (a command in another environment) and talk to it over gRPC.

`served_gateway(command, env=, port=, cwd=)` starts the command in its own session; the test waits
for a SERVING health check, asks for an analysis and stops it with SIGTERM, which must end every
process it started. Its output is attached to the report of a failing test.
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
        """SIGTERM `vqs serve` (the command itself, or its process inside a container runner) as an
        orchestrator would; it must exit and everything it started (Triton, stubs, decode workers)
        must go with it. Returns the command's exit code."""
        if self.process.poll() is None:
            started = _descendants(self.process.pid)
            serve = next(
                (pid for pid in [self.process.pid, *started] if _is_vqs_serve(pid)), self.process.pid
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(serve, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                pytest.fail(f"`vqs serve` did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM")
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while left := [pid for pid in started if Path(f"/proc/{pid}").exists()]:
                if time.monotonic() > deadline:
                    for pid in left:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    pytest.fail(f"processes started by `vqs serve` outlived it: {left}")
                time.sleep(0.2)
        return self.process.returncode


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descendants(pid: int) -> list[int]:
    children: dict[int | None, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(_parent(int(entry.name)), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_vqs_serve(pid: int) -> bool:
    """`python .../vqs serve` (a console script run through its interpreter)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return False
    return len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1].endswith("/vqs") \
        and argv[2] == "serve"


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
