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
    for uri in ("clips/normal.mp4", str(served_file), f"file://{served_file}"):
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


async def test_network_urls_are_rejected(stub):
    error = await rejected(stub, "http://example.com/video.mp4")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
