"""`uri` sources: only files under the allowed root."""

from __future__ import annotations

import os
import shutil

import grpc
import pytest

from server.proto import video_analytics_pb2 as pb

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served_file(allowed_root, videos):
    target = allowed_root / "clips" / "normal.mp4"
    target.parent.mkdir(exist_ok=True)
    shutil.copy(videos["normal"], target)
    return target


async def rejected(stub, uri: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Analyze(pb.AnalyzeRequest(uri=uri))
    return error.value


async def test_relative_and_absolute_uri_inside_the_root(stub, served_file, allowed_root):
    for uri in ("clips/normal.mp4", str(served_file)):
        response = await stub.Analyze(pb.AnalyzeRequest(uri=uri), timeout=120)
        assert response.video.clips >= 2


async def test_uri_outside_the_root_is_denied(stub, videos):
    error = await rejected(stub, str(videos["normal"]))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "outside the allowed root" in error.details()


async def test_traversal_is_rejected(stub, served_file):
    error = await rejected(stub, "clips/../../../etc/passwd")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'..'" in error.details()


async def test_symlink_escaping_the_root_is_denied(stub, allowed_root, videos):
    link = allowed_root / "escape.mp4"
    if not link.exists():
        os.symlink(videos["normal"], link)
    error = await rejected(stub, "escape.mp4")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "symlink" in error.details()


async def test_missing_file_is_not_found(stub, served_file):
    error = await rejected(stub, "clips/missing.mp4")
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_urls_are_rejected_file_urls_too(stub, served_file):
    for uri in ("http://example.com/video.mp4", f"file://{served_file}"):
        error = await rejected(stub, uri)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not URLs" in error.details()


async def test_paths_the_file_system_refuses_are_invalid_argument(stub, allowed_root):
    loop = allowed_root / "loop_a.mp4"
    if not loop.is_symlink():
        os.symlink(allowed_root / "loop_b.mp4", loop)
        os.symlink(loop, allowed_root / "loop_b.mp4")
    for uri, reason in (("loop_a.mp4", "symlink loop"), ("n" * 300 + ".mp4", "too long")):
        error = await rejected(stub, uri)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert reason in error.details()


async def test_a_20_kb_uri_or_encoder_is_invalid_argument_not_a_transport_error(stub):
    for request in (pb.AnalyzeRequest(uri="http://" + "h" * 20_000),
                    pb.AnalyzeRequest(video=b"x", encoder="e-" * 10_000)):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Analyze(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()[:200]
        assert len(error.value.details()) < 1000
