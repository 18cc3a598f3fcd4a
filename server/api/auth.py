"""Who may call the gateway: TLS server credentials (mutual TLS optional), the bearer token, and
the start-up checks that refuse a configuration that would expose the gateway unprotected.

The interceptor asks `BearerToken.refusal(metadata)` on every RPC except the gRPC health service
(load balancers and orchestrators probe it without credentials). Reflection is protected like the
API: it describes every method (grpcurl sends its `-H` headers on reflection calls too).
Start-up problems raise `SecurityConfigError` with one line naming the setting.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl
from collections.abc import Iterable
from pathlib import Path

import grpc

from server.errors import VqsError
from server.settings import SecuritySettings

AUTHORIZATION_HEADER = "authorization"
SCHEME = "bearer"
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


class Unauthenticated(VqsError):
    code = grpc.StatusCode.UNAUTHENTICATED


class SecurityConfigError(ValueError):
    """The security settings cannot be served as they are; the message names the setting."""


class BearerToken:
    """The expected token; `refusal` says why a call's metadata does not carry it (None: it does).

    Compared as SHA-256 digests with `hmac.compare_digest`: constant time, and the comparison
    does not reveal the token's length either. Messages never repeat what the caller sent.
    """

    def __init__(self, token: str):
        if not token:
            raise ValueError("the bearer token is empty")
        self._digest = hashlib.sha256(token.encode()).digest()

    def matches(self, candidate: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(candidate.encode()).digest(), self._digest)

    def refusal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        values = [value for key, value in metadata or () if key == AUTHORIZATION_HEADER]
        if not values:
            return (
                "missing bearer token: send metadata `authorization: Bearer <token>` "
                "(vqs clients: --token or VQS_TOKEN)"
            )
        if len(values) > 1:
            return "more than one `authorization` metadata entry; send exactly one"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, candidate = value.strip().partition(" ")
        if scheme.lower() != SCHEME or not candidate.strip():
            return "the `authorization` metadata must be `Bearer <token>`"
        if not self.matches(candidate.strip()):
            return "invalid bearer token"
        return None


def is_exempt(method: str) -> bool:
    """RPCs open without a token: the gRPC health service only."""
    return method.startswith(HEALTH_METHOD_PREFIX)


def _read(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(
            f"security.{setting}: cannot read {path} ({exc.strerror or exc})"
        ) from None
    if not data.strip():
        raise SecurityConfigError(f"security.{setting}: {path} is empty")
    return data


def _checked(token: str, setting: str) -> BearerToken:
    # gRPC metadata values are visible ASCII; a space would split `Bearer <token>`.
    if not all("!" <= c <= "~" for c in token):
        raise SecurityConfigError(f"security.{setting}: the token must be visible ASCII without spaces")
    return BearerToken(token)


def load_token(security: SecuritySettings) -> BearerToken | None:
    """The token from `security.token` or `security.token_file` (None: no token required)."""
    if security.token is not None:
        return _checked(security.token.get_secret_value().strip(), "token")
    if security.token_file is not None:
        text = _read(security.token_file, "token_file").decode("utf-8", "replace").strip()
        return _checked(text, "token_file")
    return None


def _check_pair(cert: Path, cert_pem: bytes, key: Path, key_pem: bytes) -> None:
    """Check the certificate and key load and belong together (with the stdlib's OpenSSL): gRPC
    would only fail each handshake later, with nothing naming the setting."""
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise SecurityConfigError(f"security.tls_cert: {cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key_pem:
        raise SecurityConfigError(f"security.tls_key: {key} holds no PEM private key")
    if b"ENCRYPTED" in key_pem:
        raise SecurityConfigError(f"security.tls_key: {key} is encrypted; gRPC needs it unencrypted")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")  # never prompt on a terminal
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise SecurityConfigError(
                f"security.tls_key: {key} is not the private key of security.tls_cert {cert}"
            ) from None
        raise SecurityConfigError(
            f"security.tls_cert, security.tls_key: OpenSSL cannot load {cert} with {key} ({reason})"
        ) from None


def _check_ca(path: Path) -> None:
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise SecurityConfigError(
            f"security.tls_client_ca: {path} holds no PEM CA certificate ({exc.reason or exc})"
        ) from None


def server_credentials(security: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext). Files are read and checked here, once."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    cert = _read(security.tls_cert, "tls_cert")
    key = _read(security.tls_key, "tls_key")
    _check_pair(security.tls_cert, cert, security.tls_key, key)
    client_ca = None
    if security.tls_client_ca is not None:
        client_ca = _read(security.tls_client_ca, "tls_client_ca")
        _check_ca(security.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None and security.tls_require_client_cert,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, security: SecuritySettings) -> None:
    """Refuse to listen beyond loopback without TLS and client authentication (a token or
    required client certificates), unless `security.allow_insecure_public` says the network is
    trusted."""
    if is_loopback(host) or security.allow_insecure_public:
        return
    tls = security.tls_cert is not None
    client_certs = security.tls_client_ca is not None and security.tls_require_client_cert
    token = security.token is not None or security.token_file is not None
    if tls and (token or client_certs):
        return
    missing = "TLS (security.tls_cert, security.tls_key)" if not tls else (
        "client authentication (security.token or security.token_file, or security.tls_client_ca)"
    )
    raise SecurityConfigError(
        f"refusing to listen on {host}, beyond loopback, without {missing}; "
        "set them, or set security.allow_insecure_public=true on a trusted network"
    )
