"""Resolve a request's `uri` to a file under the configured root, or say precisely why not.

A `uri` is a path, relative to the root or absolute inside it; URLs of any scheme (`file://`
included) are refused.
"""

from __future__ import annotations

import errno
from pathlib import Path, PurePosixPath

from server.errors import InvalidInput, NotFound, PermissionDenied, TooLarge, VqsError, echo


def _filesystem_error(uri: str, exc: OSError | RuntimeError) -> VqsError:
    """What a file-system failure on the caller's path means for the caller."""
    if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:  # RuntimeError: Python < 3.13
        return InvalidInput(f"uri {echo(uri)} is a symlink loop")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidInput(f"uri {echo(uri)}: the path or one of its names is too long")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"uri {echo(uri)}: the server may not read it")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"uri {echo(uri)}: no such file under the allowed root")
    return InvalidInput(f"uri {echo(uri)} cannot be read: {exc.strerror or type(exc).__name__}")


def resolve_uri(uri: str, allowed_root: Path | None, *, max_bytes: int) -> Path:
    if allowed_root is None:
        raise PermissionDenied(
            "path sources are disabled: the server has no allowed root "
            "(security.allowed_root, VQS_SECURITY__ALLOWED_ROOT); upload the video bytes instead"
        )
    if "://" in uri:
        raise InvalidInput(f"uri {echo(uri)}: only paths are accepted, not URLs")
    if "\x00" in uri or not uri.strip():
        raise InvalidInput("uri is empty or contains a NUL byte")
    if ".." in PurePosixPath(uri).parts:
        raise InvalidInput(f"uri {echo(uri)} contains '..'; give a path inside the allowed root")

    configured = Path(allowed_root).absolute()
    root = configured.resolve()
    candidate = Path(uri) if Path(uri).is_absolute() else root / uri
    # Lexically first (no file-system probing outside the root), then after resolving symlinks.
    if not (candidate.is_relative_to(root) or candidate.is_relative_to(configured)):
        raise PermissionDenied(f"uri {echo(uri)} is outside the allowed root")
    try:
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root):
            raise PermissionDenied(
                f"uri {echo(uri)} resolves (through a symlink) outside the allowed root"
            )
        if not resolved.exists():
            raise NotFound(f"uri {echo(uri)}: no such file under the allowed root")
        if not resolved.is_file():
            raise InvalidInput(f"uri {echo(uri)} is not a regular file")
        size = resolved.stat().st_size
    except (OSError, RuntimeError) as exc:
        raise _filesystem_error(uri, exc) from None
    if size > max_bytes:
        raise TooLarge(
            f"file is {size} bytes; the limit is {max_bytes} bytes (limits.max_upload_bytes)"
        )
    if size == 0:
        raise InvalidInput(f"uri {echo(uri)} is an empty file")
    return resolved
