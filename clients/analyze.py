"""`vqs analyze PATH`: upload one video, print the answers and where the model looked."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console

from clients import compute, render, timeline
from clients.channel import (
    DEFAULT_SERVER, ChannelConfig, ServerOption, TlsCaOption, TlsCertOption, TlsKeyOption, TokenOption,
    config_from_options, open_channel,
)
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc

# The gateway tags every answer, errors included, with this trailing metadata key (its request id).
REQUEST_ID_HEADER = "x-request-id"
MESSAGE_HEADROOM_BYTES = 1 << 20

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 4

stdout = Console()
stderr = Console(stderr=True)


def exit_code_for(code: grpc.StatusCode, *, answered: bool = False) -> int:
    """4 when no gateway answered; an UNAVAILABLE from the gateway itself (its Triton is down or
    restarting) is an error like any other the server reports."""
    unreachable = code == grpc.StatusCode.UNAVAILABLE and not answered
    return EXIT_UNAVAILABLE if unreachable else EXIT_ERROR


def answered_by_gateway(exc: grpc.RpcError) -> bool:
    """True when the status came from the gateway (it tags every answer with a request id), not
    from a connection that failed."""
    trailers = exc.trailing_metadata() or ()
    return any(key == REQUEST_ID_HEADER for key, _ in trailers)


def error_message(code: grpc.StatusCode, details: str | None) -> str:
    return f"{code.name}: {details or 'no details'}"


def check_upload_size(size: int, max_upload_mb: float) -> None:
    """Raise `typer.BadParameter` (exit 2) when the file is above the upload limit."""
    limit = int(max_upload_mb * 2**20)
    if size > limit:
        raise typer.BadParameter(
            f"the file is {size / 2**20:.1f} MB, above the upload limit of {max_upload_mb:g} MB; "
            "raise --max-upload-mb (the server has its own limit too)",
            param_hint="PATH",
        )
    if size == 0:
        raise typer.BadParameter("the file is empty", param_hint="PATH")


def check_budget(value: float | None) -> float | None:
    """Raise `typer.BadParameter` (exit 2) for a budget outside (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value:g} is outside (0, 1]: the share of the encoder's full compute to spend")
    return value


def channel_options(max_upload_mb: float) -> list[tuple[str, int]]:
    limit = int(max_upload_mb * 2**20) + MESSAGE_HEADROOM_BYTES
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    ]


def unreachable_hint(config: ChannelConfig) -> str:
    """What to check when no gateway answered."""
    hint = f"is the gateway running at {config.server}? (`vqs serve`, --server, VQS_SERVER)"
    if config.tls:
        hint += "; does it serve TLS with a certificate --tls-ca trusts (and accept --tls-cert)?"
    return hint


def call_analyze(
    config: ChannelConfig, data: bytes, *, encoder: str, timeout: float | None, max_upload_mb: float,
    embeddings: bool = False, omit_segments: bool = False, budget: float = 0.0,
) -> pb.AnalyzeResponse:
    with open_channel(config, options=channel_options(max_upload_mb)) as channel:
        stub = pb_grpc.VideoAnalyticsStub(channel)
        request = pb.AnalyzeRequest(video=data, encoder=encoder, embeddings=embeddings, omit_segments=omit_segments,
                                    budget=budget)
        return stub.Analyze(request, timeout=timeout)


def analyze(
    path: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="Video file to analyze."),
    ],
    server: ServerOption = DEFAULT_SERVER,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of tables.")
    ] = False,
    encoder: Annotated[
        str, typer.Option(help="Clip encoder, e.g. s3d or vit_ats; empty = the server's default.")
    ] = "",
    budget: Annotated[
        float | None, typer.Option(
            callback=check_budget,
            help="Share of an adaptive encoder's full compute to spend, in (0, 1] (default 1 = full; "
                 "the Compute table says what was spent).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Deadline for the whole call, in seconds.")
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option(min=0.001, help="Refuse files larger than this many MB.")
    ] = 256.0,
    png: Annotated[
        Path | None, typer.Option(
            dir_okay=False, help="Also draw the report picture (as `vqs render`) into this PNG.")
    ] = None,
    embeddings: Annotated[
        bool, typer.Option("--embeddings", help="Also fetch per-frame embeddings (in --json, packed base64).")
    ] = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    token: TokenOption = None,
) -> None:
    """Upload a video to the gateway; print the answers, attention and sub-actions over time."""
    config = config_from_options(server, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
    if png is not None:
        from clients import report

        report.require_matplotlib()
    size = path.stat().st_size
    check_upload_size(size, max_upload_mb)
    data = path.read_bytes()
    try:
        with stderr.status(f"analyzing {path.name} ({size / 2**20:.1f} MB) on {server}"):
            resp = call_analyze(config, data, encoder=encoder, timeout=timeout, max_upload_mb=max_upload_mb,
                                embeddings=embeddings, budget=budget or 0.0)
    except grpc.RpcError as exc:
        code = exc.code()
        stderr.print(f"[red]error[/red] {error_message(code, exc.details())}", highlight=False, soft_wrap=True)
        answered = answered_by_gateway(exc)
        if code == grpc.StatusCode.UNAVAILABLE and not answered:
            stderr.print(unreachable_hint(config), highlight=False)
        raise typer.Exit(exit_code_for(code, answered=answered)) from None
    result = render.response_to_dict(resp)
    if png is not None:
        report.render_report(result, path, png, title=path.name)
        stderr.print(f"report picture: {png}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    stdout.print(render.summary_line(result), highlight=False, soft_wrap=True)
    stdout.print(render.domain_line(result), soft_wrap=True)
    stdout.print(render.answers_table(result))
    stdout.print(render.attention_table(result))
    if (segments := timeline.timeline_table(result)) is not None:
        stdout.print(segments)
    if (spent := compute.compute_table(result)) is not None:
        stdout.print(spent)
