from __future__ import annotations

import os

import pytest

from server.api.sources import resolve_uri
from server.errors import InvalidInput, NotFound, PermissionDenied, TooLarge


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.mp4").write_bytes(b"x" * 10)
    (tmp_path / "secret.mp4").write_bytes(b"s" * 10)
    return root


def test_relative_and_absolute(root):
    target = (root / "sub" / "a.mp4").resolve()
    for uri in ("sub/a.mp4", str(root / "sub" / "a.mp4")):
        assert resolve_uri(uri, root, max_bytes=100) == target


def test_file_urls_are_refused_like_any_url(root):
    with pytest.raises(InvalidInput, match="not URLs"):
        resolve_uri(f"file://{root}/sub/a.mp4", root, max_bytes=100)


def test_a_symlink_loop_is_invalid_input(root):
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    with pytest.raises(InvalidInput, match="symlink loop"):
        resolve_uri("loop_a", root, max_bytes=100)


@pytest.mark.parametrize("uri", ["x" * 300 + ".mp4", "sub/" + "y" * 5000])
def test_a_name_too_long_is_invalid_input(root, uri):
    with pytest.raises(InvalidInput, match="too long") as error:
        resolve_uri(uri, root, max_bytes=100)
    assert len(str(error.value)) < 300  # the caller's value is echoed cut short


def test_huge_values_are_echoed_cut_short(root):
    for uri in ("http://" + "h" * 20_000, "../" * 7000, "x" * 20_000 + "/.."):
        with pytest.raises(InvalidInput) as error:
            resolve_uri(uri, root, max_bytes=100)
        assert len(str(error.value)) < 300


def test_disabled_without_a_root():
    with pytest.raises(PermissionDenied, match="disabled"):
        resolve_uri("a.mp4", None, max_bytes=100)


@pytest.mark.parametrize("uri", ["../secret.mp4", "sub/../../secret.mp4", "sub/../a.mp4"])
def test_traversal(root, uri):
    with pytest.raises(InvalidInput, match=r"'\.\.'"):
        resolve_uri(uri, root, max_bytes=100)


def test_absolute_path_outside(root):
    with pytest.raises(PermissionDenied, match="outside the allowed root"):
        resolve_uri(str(root.parent / "secret.mp4"), root, max_bytes=100)


def test_symlink_escaping(root):
    os.symlink(root.parent / "secret.mp4", root / "link.mp4")
    with pytest.raises(PermissionDenied, match="symlink"):
        resolve_uri("link.mp4", root, max_bytes=100)


def test_symlink_inside_is_fine(root):
    os.symlink(root / "sub" / "a.mp4", root / "alias.mp4")
    assert resolve_uri("alias.mp4", root, max_bytes=100) == (root / "sub" / "a.mp4").resolve()


def test_missing_directory_and_empty_and_large(root):
    with pytest.raises(NotFound):
        resolve_uri("sub/none.mp4", root, max_bytes=100)
    with pytest.raises(InvalidInput, match="not a regular file"):
        resolve_uri("sub", root, max_bytes=100)
    (root / "empty.mp4").write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        resolve_uri("empty.mp4", root, max_bytes=100)
    with pytest.raises(TooLarge, match="limit is 5 bytes"):
        resolve_uri("sub/a.mp4", root, max_bytes=5)


@pytest.mark.parametrize("uri", ["http://host/a.mp4", "s3://bucket/a.mp4", "", "a\x00b"])
def test_rejects_urls_and_garbage(root, uri):
    with pytest.raises(InvalidInput):
        resolve_uri(uri, root, max_bytes=100)
