"""The one error hierarchy of the gateway; `code` is the gRPC status each maps to.

Messages are shown to the caller, except for `InternalError`s: the caller gets only a request id
and the message goes to the log. A message that repeats a value the caller sent passes it through
`echo`, so a huge value cannot make the status itself too large to send.
"""

from __future__ import annotations

import grpc

ECHO_LIMIT = 100  # characters of a caller's value repeated in an error message


def echo(value: object) -> str:
    """`repr(value)` for an error message, cut to `ECHO_LIMIT` characters."""
    text = repr(value)
    if len(text) <= ECHO_LIMIT:
        return text
    size = f"{len(value)} characters" if isinstance(value, str | bytes) else "cut"
    return f"{text[:ECHO_LIMIT]}... ({size})"


class VqsError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(VqsError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class UnsupportedMedia(InvalidInput):
    """The bytes are not a video the decoders can read; the message carries their reason."""


class NotFound(VqsError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(VqsError):
    code = grpc.StatusCode.PERMISSION_DENIED


class TooLarge(VqsError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(VqsError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Timeout(VqsError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BackendUnavailable(VqsError):
    code = grpc.StatusCode.UNAVAILABLE


class InternalError(VqsError):
    """A fault of the server, not of the request (e.g. arrays of the wrong shape between stages)."""

    code = grpc.StatusCode.INTERNAL


class InferenceFailed(InternalError):
    """Triton or a model failed on a request the gateway built."""
