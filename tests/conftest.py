"""Session fixtures: the real Triton (our launcher), the real gateway, synthesized videos.

Settings come from `Settings()` (so `VQS_*` variables apply, e.g. `VQS_TRITON__MODEL_REPOSITORY`
to test another repository); ports are free ones picked at start-up. When a test fails, the tail
of the Triton and gateway logs is attached to its report.
"""

from __future__ import annotations

import logging
from pathlib import Path

# PyAV before decord in every test process: the first FFmpeg loaded serves both packages, and
# decord's bundled one lacks what PyAV's encoders need (see export/data.py).
import av  # noqa: F401
import grpc
import pytest
import pytest_asyncio

from server.launcher import TritonProcess, free_port
from server.logs import FORMAT, RequestIdFilter
from server.settings import Settings
from tests.media import write_long_video

LOG_TAIL_LINES = 80
_session_logs: dict[str, Path] = {}


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for name, path in _session_logs.items():
            report.sections.append((f"{name} (last {LOG_TAIL_LINES} lines)", _tail(path)))
    return report


@pytest.fixture
def show_log_on_failure():
    """`show_log_on_failure(name, path)`: attach that log's tail to this test's report if it fails."""
    added: list[str] = []

    def show(name: str, path: Path) -> None:
        _session_logs[name] = path
        added.append(name)

    yield show
    for name in added:
        _session_logs.pop(name, None)


@pytest.fixture(scope="session")
def model_repository() -> Path:
    return Path(Settings().triton.model_repository)


MODEL_ARTIFACTS = ("clip_encoder_s3d/1/model.onnx", "tqn_decoder/1/model.onnx")


def missing_artifacts(model_repository: Path) -> list[str]:
    return [name for name in MODEL_ARTIFACTS if not (model_repository / name).is_file()]


@pytest.fixture(scope="session")
def trained_models(model_repository: Path) -> Path:
    """The model repository with its exported models. Without them every test that needs them
    FAILS (never skips: a green `make test` must mean the integration tests ran)."""
    missing = missing_artifacts(model_repository)
    if missing:
        pytest.fail(
            f"model artifacts missing from {model_repository}: {', '.join(missing)}. "
            "Run `make models` (or `vqs models`) to train and export them, or point "
            "VQS_TRITON__MODEL_REPOSITORY at a repository that has them.",
            pytrace=False,
        )
    return model_repository


@pytest.fixture(scope="session")
def queries(model_repository: Path) -> list[str]:
    """The query names in the order the gateway answers them (read from the query decoder's
    config, as the gateway reads them)."""
    from tests.vocabulary import query_names

    return query_names(model_repository)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def gateway_log(log_dir: Path) -> Path:
    """Everything the server logs during the session goes to this file too."""
    path = log_dir / "gateway.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    server_logger = logging.getLogger("server")
    previous = server_logger.level
    server_logger.setLevel(logging.INFO)
    _session_logs["gateway log"] = path
    yield path
    server_logger.setLevel(previous)
    root.removeHandler(handler)
    handler.close()


@pytest.fixture(scope="session")
def triton(trained_models: Path, log_dir: Path, gateway_log: Path):
    """One real tritonserver for the whole session."""
    settings = Settings().triton.model_copy(update={"model_repository": trained_models})
    process = TritonProcess(settings, log_path=log_dir / "tritonserver.log")
    _session_logs["tritonserver log"] = process.log_path
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def allowed_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("allowed_root")


async def _start_gateway(triton: TritonProcess, allowed_root: Path, **overrides):
    """A real gateway on free ports, using the session's Triton."""
    from server.main import Gateway

    settings = Settings().model_copy(
        update={
            "grpc_port": 0,
            "metrics_port": free_port(),
            "triton": Settings().triton.model_copy(
                update={"url": triton.grpc_url, "model_repository": triton.model_repository}
            ),
            "security": Settings().security.model_copy(update={"allowed_root": allowed_root}),
            **overrides,
        }
    )
    gateway = Gateway(settings)
    try:
        await gateway.start()
    except BaseException:
        await gateway.stop()
        raise
    return gateway


@pytest.fixture(scope="session")
def start_gateway(triton: TritonProcess, allowed_root: Path):
    """`await start_gateway(**settings_overrides)` -> a started extra gateway (stop it yourself)."""

    async def start(**overrides):
        return await _start_gateway(triton, allowed_root, **overrides)

    return start


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def gateway(triton: TritonProcess, allowed_root: Path):
    gateway = await _start_gateway(triton, allowed_root)
    yield gateway
    await gateway.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def channel(gateway):
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel):
    from server.proto import video_analytics_pb2_grpc as pb_grpc

    return pb_grpc.VideoAnalyticsStub(channel)


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Synthesized test videos (the project's generator): name -> path."""
    from export.synth import render_video

    out = tmp_path_factory.mktemp("videos")
    paths = {
        "normal": out / "normal.mp4",
        "short": out / "short.mp4",
        "mpeg4": out / "other_codec.avi",
    }
    render_video(paths["normal"], seed=11, seconds=4.0)
    render_video(paths["short"], seed=12, seconds=0.3)
    render_video(paths["mpeg4"], seed=13, seconds=2.5, codec="mpeg4")
    corrupt = out / "corrupt.mp4"
    data = paths["normal"].read_bytes()
    # Keep the container's first bytes, scramble the rest: recognisably mp4, undecodable.
    corrupt.write_bytes(data[:32] + bytes((b * 7 + 13) % 256 for b in data[32:4096]))
    paths["corrupt"] = corrupt
    return paths


@pytest.fixture(scope="session")
def long_video(tmp_path_factory) -> Path:
    """LONG_VIDEO_S of 720p test pattern: seconds of decoding, so a second request, a cancel or
    a deadline arrives while its analysis is still running."""
    return write_long_video(tmp_path_factory.mktemp("long") / "long.mp4")
