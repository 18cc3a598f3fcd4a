"""Resolve a request's `uri` to a file under the configured root, or say precisely why not."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from server.errors import InvalidInput, NotFound, PermissionDenied, TooLarge


def resolve_uri(uri: str, allowed_root: Path | None, *, max_bytes: int) -> Path:
    if allowed_root is None:
        raise PermissionDenied(
            "path sources are disabled: the server has no allowed root "
            "(security.allowed_root, VQS_SECURITY__ALLOWED_ROOT); upload the video bytes instead"
        )
    raw = uri.removeprefix("file://")
    if "://" in raw:
        raise InvalidInput(f"uri {uri!r}: only local paths are accepted, not network URLs")
    if "\x00" in raw or not raw.strip():
        raise InvalidInput("uri is empty or contains a NUL byte")
    if ".." in PurePosixPath(raw).parts:
        raise InvalidInput(f"uri {uri!r} contains '..'; give a path inside the allowed root")

    configured = Path(allowed_root).absolute()
    root = configured.resolve()
    candidate = Path(raw) if Path(raw).is_absolute() else root / raw
    # Lexically first (no file-system probing outside the root), then after resolving symlinks.
    if not (candidate.is_relative_to(root) or candidate.is_relative_to(configured)):
        raise PermissionDenied(f"uri {uri!r} is outside the allowed root")
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise PermissionDenied(f"uri {uri!r} resolves (through a symlink) outside the allowed root")
    if not resolved.exists():
        raise NotFound(f"uri {uri!r}: no such file under the allowed root")
    if not resolved.is_file():
        raise InvalidInput(f"uri {uri!r} is not a regular file")
    size = resolved.stat().st_size
    if size > max_bytes:
        raise TooLarge(
            f"file is {size} bytes; the limit is {max_bytes} bytes (limits.max_upload_bytes)"
        )
    if size == 0:
        raise InvalidInput(f"uri {uri!r} is an empty file")
    return resolved
