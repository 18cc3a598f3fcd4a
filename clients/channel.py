"""The one place the clients open a gRPC channel to the gateway: plaintext or TLS (`--tls-ca`,
with `--tls-cert`/`--tls-key` for mutual TLS), and the bearer token (`--token` or `VQS_TOKEN`)
sent as `authorization: Bearer ...` metadata on every call by a channel interceptor, so callers
pass no metadata themselves.

A command takes the options with the `Annotated` aliases below (`ServerOption`, default
`DEFAULT_SERVER`, and the TLS and token ones), turns them into a `ChannelConfig`
with `config_from_options` (which reads the PEM files, so a Ray actor gets bytes, not paths), and
opens channels with `open_channel` (blocking) or `open_aio_channel` (asyncio).
"""

from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import grpc
import typer

AUTHORIZATION_HEADER = "authorization"
DEFAULT_SERVER = "127.0.0.1:50051"

ServerOption = Annotated[str, typer.Option(envvar="VQS_SERVER", help="Gateway address, HOST:PORT.")]
TlsCaOption = Annotated[Path | None, typer.Option(
    "--tls-ca", envvar="VQS_TLS_CA", dir_okay=False,
    help="PEM CA certificate(s) to verify the gateway's TLS certificate; connects with TLS.")]
TlsCertOption = Annotated[Path | None, typer.Option(
    "--tls-cert", envvar="VQS_TLS_CERT", dir_okay=False,
    help="PEM client certificate for mutual TLS (with --tls-key).")]
TlsKeyOption = Annotated[Path | None, typer.Option(
    "--tls-key", envvar="VQS_TLS_KEY", dir_okay=False,
    help="PEM private key of --tls-cert.")]
TokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="VQS_TOKEN", show_default=False,
    help="Bearer token the gateway requires (prefer the VQS_TOKEN variable: a command line is "
         "visible to other users of the machine).")]


@dataclass(frozen=True)
class ChannelConfig:
    """Where the gateway is and how to reach it; picklable (sent to Ray actors as is)."""

    server: str
    root_certificates: bytes | None = None  # set: TLS
    certificate_chain: bytes | None = None  # set (with private_key): mutual TLS
    private_key: bytes | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None

    def __repr__(self) -> str:  # never print the token or the key
        return f"ChannelConfig(server={self.server!r}, tls={self.tls}, token={'set' if self.token else 'none'})"


def _read_pem(path: Path, option: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}", param_hint=option) from None
    if marker not in data:
        raise typer.BadParameter(f"{path} is not PEM ({marker.decode()} not found)", param_hint=option)
    return data


def is_loopback(server: str) -> bool:
    host = server.rsplit(":", 1)[0].strip("[]") if ":" in server else server
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from_options(
    server: str, *, tls_ca: Path | None = None, tls_cert: Path | None = None,
    tls_key: Path | None = None, token: str | None = None,
) -> ChannelConfig:
    """The options checked and their files read; a problem is a `typer.BadParameter` (exit 2).
    A token about to cross a network unencrypted is warned about on stderr."""
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give --tls-cert and --tls-key together", param_hint="--tls-cert")
    if tls_cert is not None and tls_ca is None:
        raise typer.BadParameter(
            "a client certificate is only sent over TLS: add --tls-ca (the gateway's CA)",
            param_hint="--tls-cert",
        )
    token = token.strip() if token else None
    if token is not None and not all("!" <= c <= "~" for c in token):
        raise typer.BadParameter("the token must be visible ASCII without spaces", param_hint="--token")
    config = ChannelConfig(
        server=server,
        root_certificates=_read_pem(tls_ca, "--tls-ca", b"CERTIFICATE") if tls_ca else None,
        certificate_chain=_read_pem(tls_cert, "--tls-cert", b"CERTIFICATE") if tls_cert else None,
        private_key=_read_pem(tls_key, "--tls-key", b"PRIVATE KEY") if tls_key else None,
        token=token or None,
    )
    if warning := plaintext_token_warning(config):
        typer.echo(warning, err=True)
    return config


def plaintext_token_warning(config: ChannelConfig) -> str | None:
    """What to tell the user when the token would cross a network unencrypted (None: it won't)."""
    if config.token and not config.tls and not is_loopback(config.server):
        return (f"warning: sending the token to {config.server} without TLS; "
                "anyone on the path can read it (use --tls-ca)")
    return None


def _credentials(config: ChannelConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=config.root_certificates,
        private_key=config.private_key,
        certificate_chain=config.certificate_chain,
    )


def _with_token(metadata, token: str) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in (metadata or ()) if k != AUTHORIZATION_HEADER]
    return [*kept, (AUTHORIZATION_HEADER, f"Bearer {token}")]


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str):
        self.token = token

    def _details(self, d: grpc.ClientCallDetails) -> _Details:
        return _Details(d.method, d.timeout, _with_token(d.metadata, self.token), d.credentials,
                        getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _AioToken:
    """Adds the token to a call's metadata. grpc.aio files each interceptor under ONE kind of call
    (the first base it matches), so there is one subclass per kind."""

    def __init__(self, token: str):
        self.token = token

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            d.method, d.timeout, grpc.aio.Metadata(*_with_token(d.metadata, self.token)),
            d.credentials, d.wait_for_ready,
        )


class _AioTokenUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioTokenUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioTokenStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioTokenStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


_AIO_INTERCEPTORS = (_AioTokenUnaryUnary, _AioTokenUnaryStream, _AioTokenStreamUnary, _AioTokenStreamStream)


def open_channel(config: ChannelConfig, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
    """A blocking channel (usable as a context manager)."""
    if config.tls:
        channel = grpc.secure_channel(config.server, _credentials(config), options=options)
    else:
        channel = grpc.insecure_channel(config.server, options=options)
    if config.token:
        channel = grpc.intercept_channel(channel, _SyncToken(config.token))
    return channel


def open_aio_channel(
    config: ChannelConfig, options: list[tuple[str, int]] | None = None
) -> grpc.aio.Channel:
    """An asyncio channel (`async with`)."""
    interceptors = [kind(config.token) for kind in _AIO_INTERCEPTORS] if config.token else None
    if config.tls:
        return grpc.aio.secure_channel(
            config.server, _credentials(config), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(config.server, options=options, interceptors=interceptors)
