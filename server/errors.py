"""The one error hierarchy of the gateway; `code` is the gRPC status each maps to."""

from __future__ import annotations

import grpc


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


class InferenceFailed(VqsError):
    code = grpc.StatusCode.INTERNAL
