"""The bearer token check, the TLS and exposure start-up checks, and the interceptor refusing
calls on a real grpc.aio server over TLS with certificates made here (no Triton needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import SecretStr, ValidationError

from clients import channel as client_channel
from server.api import auth
from server.api.interceptor import GatewayInterceptor
from server.metrics import Metrics
from server.settings import SecuritySettings, Settings
from tests.certificates import Pki, make_pki

TOKEN = "s3cr3t-token-value"
SERVICE = "vqs.v1.Probe"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- the token ----------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata, expected", [
    ((), "missing bearer token"),
    ((("x-request-id", "r1"),), "missing bearer token"),
    ((("authorization", "Bearer wrong-token"),), "invalid bearer token"),
    ((("authorization", f"Bearer {TOKEN}x"),), "invalid bearer token"),
    ((("authorization", TOKEN),), "must be `Bearer <token>`"),
    ((("authorization", f"Basic {TOKEN}"),), "must be `Bearer <token>`"),
    ((("authorization", "Bearer "),), "must be `Bearer <token>`"),
    ((("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")), "more than one"),
])
def test_token_refusals_say_why_without_repeating_the_caller(metadata, expected):
    refusal = auth.BearerToken(TOKEN).refusal(metadata)
    assert refusal is not None and expected in refusal
    assert TOKEN not in refusal and "wrong-token" not in refusal


@pytest.mark.parametrize("value", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"  Bearer   {TOKEN} "])
def test_the_right_token_passes(value):
    assert auth.BearerToken(TOKEN).refusal((("authorization", value),)) is None


def test_token_comparison_is_exact():
    token = auth.BearerToken(TOKEN)
    assert token.matches(TOKEN)
    assert not token.matches(TOKEN[:-1]) and not token.matches(TOKEN.upper()) and not token.matches("")
    with pytest.raises(ValueError):
        auth.BearerToken("")


def test_only_health_is_exempt():
    assert auth.is_exempt("/grpc.health.v1.Health/Check")
    assert auth.is_exempt("/grpc.health.v1.Health/Watch")
    assert not auth.is_exempt("/vqs.v1.VideoAnalytics/Analyze")
    assert not auth.is_exempt("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")


def test_token_file_is_read_once_and_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    token = auth.load_token(SecuritySettings(token_file=path))
    assert token is not None and token.matches(TOKEN)
    assert auth.load_token(SecuritySettings()) is None
    path.write_text("\n")
    with pytest.raises(auth.SecurityConfigError, match="security.token_file: .* is empty"):
        auth.load_token(SecuritySettings(token_file=path))
    with pytest.raises(auth.SecurityConfigError, match="security.token_file: cannot read"):
        auth.load_token(SecuritySettings(token_file=tmp_path / "absent"))
    path.write_text("two words\n")
    with pytest.raises(auth.SecurityConfigError, match="security.token_file: .*visible ASCII"):
        auth.load_token(SecuritySettings(token_file=path))
    with pytest.raises(auth.SecurityConfigError, match="security.token: .*visible ASCII"):
        auth.load_token(SecuritySettings(token=SecretStr("caf\u00e9")))


# -- settings and start-up checks -----------------------------------------------------------------


def test_security_settings_from_the_environment_hide_the_token(monkeypatch, tmp_path):
    for name in ("VQS_SECURITY__TLS_CERT", "VQS_SECURITY__TLS_KEY", "VQS_SECURITY__TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VQS_SECURITY__TOKEN", TOKEN)
    monkeypatch.setenv("VQS_SECURITY__ALLOW_INSECURE_PUBLIC", "true")
    s = Settings()
    assert s.security.token.get_secret_value() == TOKEN and s.security.allow_insecure_public
    assert TOKEN not in repr(s) and TOKEN not in str(s.security)
    monkeypatch.setenv("VQS_SECURITY__TLS_CERT", str(tmp_path / "cert.pem"))
    with pytest.raises(ValidationError) as error:
        Settings()  # a certificate without its key
    assert "security.tls_key" in str(error.value) and TOKEN not in str(error.value)


@pytest.mark.parametrize("fields, message", [
    ({"tls_cert": Path("c.pem")}, "set both security.tls_cert and security.tls_key"),
    ({"tls_client_ca": Path("ca.pem")}, "needs security.tls_cert"),
    ({"token": SecretStr("a"), "token_file": Path("t")}, "not both"),
    ({"token": SecretStr("  ")}, "security.token is empty"),
])
def test_inconsistent_security_settings_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        SecuritySettings(**fields)


def test_tls_files_are_checked_at_start_up_naming_the_setting(pki, tmp_path):
    def creds(**fields):
        return auth.server_credentials(SecuritySettings(**fields))

    assert creds() is None
    assert isinstance(creds(tls_cert=pki.server_cert, tls_key=pki.server_key), grpc.ServerCredentials)
    with pytest.raises(auth.SecurityConfigError, match=r"^security.tls_cert: cannot read .*absent"):
        creds(tls_cert=tmp_path / "absent.pem", tls_key=pki.server_key)
    with pytest.raises(auth.SecurityConfigError, match=r"^security.tls_key: .* is not the private key"):
        creds(tls_cert=pki.server_cert, tls_key=pki.other_key)
    with pytest.raises(auth.SecurityConfigError, match=r"^security.tls_cert: .* holds no PEM certificate"):
        creds(tls_cert=pki.server_key, tls_key=pki.server_key)
    with pytest.raises(auth.SecurityConfigError, match=r"^security.tls_key: .* holds no PEM private key"):
        creds(tls_cert=pki.server_cert, tls_key=pki.server_cert)
    with pytest.raises(auth.SecurityConfigError, match=r"^security.tls_client_ca: .* no PEM CA"):
        creds(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.server_key)


def test_public_addresses_need_tls_and_client_authentication(pki):
    tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        auth.check_exposure(host, SecuritySettings())  # loopback: anything goes
    for host in ("0.0.0.0", "::", "192.168.1.5", "gateway.example"):
        with pytest.raises(auth.SecurityConfigError, match="without TLS .*allow_insecure_public"):
            auth.check_exposure(host, SecuritySettings(token=SecretStr(TOKEN)))
    with pytest.raises(auth.SecurityConfigError, match="without client authentication"):
        auth.check_exposure("0.0.0.0", SecuritySettings(**tls))
    with pytest.raises(auth.SecurityConfigError, match="without client authentication"):  # optional certs
        auth.check_exposure("0.0.0.0", SecuritySettings(
            **tls, tls_client_ca=pki.ca, tls_require_client_cert=False))
    auth.check_exposure("0.0.0.0", SecuritySettings(**tls, token=SecretStr(TOKEN)))
    auth.check_exposure("0.0.0.0", SecuritySettings(**tls, tls_client_ca=pki.ca))
    auth.check_exposure("0.0.0.0", SecuritySettings(allow_insecure_public=True))


async def test_the_gateway_refuses_to_start_exposed_before_launching_anything(pki, tmp_path):
    from server.main import Gateway, StartupError

    base = Settings()
    exposed = base.model_copy(update={"host": "0.0.0.0", "grpc_port": 0, "metrics_port": 0,
                                      "security": SecuritySettings()})
    gateway = Gateway(exposed)
    with pytest.raises(StartupError, match="allow_insecure_public"):
        await gateway.start()
    assert gateway.triton_process is None and gateway.server is None and gateway.decoder is None

    broken = base.model_copy(update={"grpc_port": 0, "metrics_port": 0, "security": SecuritySettings(
        tls_cert=pki.server_cert, tls_key=tmp_path / "absent.key")})
    gateway = Gateway(broken)
    with pytest.raises(StartupError, match=r"^security.tls_key: cannot read"):
        await gateway.start()
    assert gateway.triton_process is None and gateway.server is None


# -- the interceptor and the client channel, over a real TLS server -------------------------------


async def unary_echo(request: bytes, context) -> bytes:
    return b"ok:" + request


def _probe_handlers(seen: list[bytes]):
    async def stream_echo(requests, context):
        async for request in requests:
            seen.append(request)
            yield b"ok:" + request

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(unary_echo),
        "Chat": grpc.stream_stream_rpc_method_handler(stream_echo),
    })


@pytest.fixture
async def probe(pki):
    """A grpc.aio server with the gateway's interceptor, TLS and a token, plus health."""
    metrics = Metrics()
    seen: list[bytes] = []
    server = grpc.aio.server(interceptors=[GatewayInterceptor(metrics, token=auth.BearerToken(TOKEN))])
    server.add_generic_rpc_handlers((_probe_handlers(seen),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    credentials = auth.server_credentials(SecuritySettings(tls_cert=pki.server_cert, tls_key=pki.server_key))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield f"127.0.0.1:{port}", metrics, seen
    await server.stop(0)


def _config(pki: Pki, address: str, token: str | None) -> client_channel.ChannelConfig:
    return client_channel.config_from_options(address, tls_ca=pki.ca, token=token)


async def test_calls_with_the_token_pass_and_others_are_unauthenticated(pki, probe):
    address, metrics, _ = probe
    async with client_channel.open_aio_channel(_config(pki, address, TOKEN)) as ch:
        assert await ch.unary_unary(f"/{SERVICE}/Echo")(b"x") == b"ok:x"
    for token, expected in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
        async with client_channel.open_aio_channel(_config(pki, address, token)) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Echo")(b"x", metadata=(("x-request-id", "r-auth"),))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert expected in error.value.details() and "wrong" not in error.value.details()
            assert dict(error.value.trailing_metadata())["x-request-id"] == "r-auth"
    # The interceptor counts a call when it leaves it, just after the status went out: the client
    # can see the status first.
    for _ in range(500):
        if metrics.errors.labels(code="UNAUTHENTICATED")._value.get() == 2 and metrics.inflight._value.get() == 0:
            break
        await asyncio.sleep(0.01)
    assert metrics.errors.labels(code="UNAUTHENTICATED")._value.get() == 2
    assert metrics.inflight._value.get() == 0


async def test_health_needs_no_token(pki, probe):
    address, _, _ = probe
    async with client_channel.open_aio_channel(_config(pki, address, None)) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_refused_stream_is_never_read(pki, probe):
    """Sent through the blocking API: an asyncio client that is still writing when the server ends
    the call may report INTERNAL instead of the server's status (grpc/grpc#36066)."""
    address, _, seen = probe

    def chat(token):
        with client_channel.open_channel(_config(pki, address, token)) as ch:
            return list(ch.stream_stream(f"/{SERVICE}/Chat")(iter([b"a", b"b"]), timeout=10))

    with pytest.raises(grpc.RpcError) as error:
        await asyncio.to_thread(chat, "wrong")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert seen == []
    async with client_channel.open_aio_channel(_config(pki, address, TOKEN)) as ch:
        call = ch.stream_stream(f"/{SERVICE}/Chat")()
        await call.write(b"a")
        await call.write(b"b")
        await call.done_writing()
        assert [reply async for reply in call] == [b"ok:a", b"ok:b"]
    assert seen == [b"a", b"b"]


async def test_the_blocking_channel_sends_the_token_too(pki, probe):
    address, _, _ = probe

    def calls(token):
        with client_channel.open_channel(_config(pki, address, token)) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Echo")(b"y", timeout=10)
            stream = list(ch.stream_stream(f"/{SERVICE}/Chat")(iter([b"1", b"2"]), timeout=10))
            return unary, stream

    assert await asyncio.to_thread(calls, TOKEN) == (b"ok:y", [b"ok:1", b"ok:2"])
    with pytest.raises(grpc.RpcError) as error:
        await asyncio.to_thread(calls, None)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_client_that_does_not_trust_the_ca_is_not_connected(pki, probe):
    address, _, _ = probe
    config = client_channel.config_from_options(address, tls_ca=pki.other_ca, token=TOKEN)
    async with client_channel.open_aio_channel(config) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await ch.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_options_are_checked_before_connecting(pki, tmp_path, capsys):
    import typer

    with pytest.raises(typer.BadParameter, match="--tls-cert and --tls-key together"):
        client_channel.config_from_options("h:1", tls_ca=pki.ca, tls_cert=pki.client_cert)
    with pytest.raises(typer.BadParameter, match="add --tls-ca"):
        client_channel.config_from_options("h:1", tls_cert=pki.client_cert, tls_key=pki.client_key)
    with pytest.raises(typer.BadParameter, match="cannot read"):
        client_channel.config_from_options("h:1", tls_ca=tmp_path / "absent.pem")
    with pytest.raises(typer.BadParameter, match="not PEM"):
        client_channel.config_from_options("h:1", tls_ca=pki.client_key)
    with pytest.raises(typer.BadParameter, match="visible ASCII"):
        client_channel.config_from_options("h:1", token="two words")
    capsys.readouterr()
    config = client_channel.config_from_options("10.0.0.2:50051", token=TOKEN)
    assert TOKEN not in repr(config)
    assert "without TLS" in client_channel.plaintext_token_warning(config)
    assert "without TLS" in capsys.readouterr().err  # every command builds its channel here
    assert client_channel.plaintext_token_warning(
        client_channel.config_from_options("127.0.0.1:50051", token=TOKEN)) is None
    assert capsys.readouterr().err == ""


# Every command that calls the gateway over gRPC takes the TLS and token options.
GRPC_COMMANDS = ("analyze", "score", "evaluate", "stream", "align", "search", "describe")
CHANNEL_OPTIONS = {"tls_ca", "tls_cert", "tls_key", "token"}


def test_every_grpc_command_takes_the_tls_and_token_options():
    import typer.main

    from clients.cli import app

    commands = typer.main.get_command(app).commands
    assert {"analyze", "score"} <= set(commands)
    for name in GRPC_COMMANDS:
        if name in commands:
            params = {p.name: p for p in commands[name].params}
            assert CHANNEL_OPTIONS <= set(params), f"vqs {name} lacks {CHANNEL_OPTIONS - set(params)}"
            assert params["token"].envvar == "VQS_TOKEN" and params["tls_ca"].opts == ["--tls-ca"]


@pytest.mark.parametrize("required", [True, False])
async def test_client_certificates_required_or_optional(pki, required):
    server = grpc.aio.server(interceptors=[GatewayInterceptor(Metrics())])
    server.add_generic_rpc_handlers((_probe_handlers([]),))
    credentials = auth.server_credentials(SecuritySettings(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
        tls_require_client_cert=required))
    address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
    await server.start()
    try:
        async def echo(**certs) -> grpc.StatusCode:
            config = client_channel.config_from_options(address, tls_ca=pki.ca, **certs)
            async with client_channel.open_aio_channel(config) as ch:
                try:
                    await ch.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=10)
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

        assert await echo(tls_cert=pki.client_cert, tls_key=pki.client_key) == grpc.StatusCode.OK
        without = await echo()
        assert without == (grpc.StatusCode.UNAVAILABLE if required else grpc.StatusCode.OK)
    finally:
        await server.stop(0)
