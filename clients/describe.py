"""`vqs describe`: what the gateway serves: queries and their attributes, and every clip encoder with
its compute (adaptive module, budget knob and limits, GMACs per clip), to choose an encoder and a
budget for `vqs analyze --encoder NAME --budget X`."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import grpc
import typer
from rich.table import Table

from clients.analyze import (
    answered_by_gateway, error_message, exit_code_for, stderr, stdout, unreachable_hint,
)
from clients.channel import (
    DEFAULT_SERVER, ServerOption, TlsCaOption, TlsCertOption, TlsKeyOption, TokenOption, config_from_options,
    open_channel,
)
from server.proto import video_analytics_pb2 as pb
from server.proto import video_analytics_pb2_grpc as pb_grpc


def describe_dict(resp: pb.DescribeModelsResponse) -> dict[str, Any]:
    """The `vqs describe --json` object."""
    return {
        "default_encoder": resp.default_encoder,
        "encoders": [
            {
                "name": e.name,
                "adaptive": e.adaptive or None,
                "knob": e.knob or None,
                "knob_full": e.knob_full if e.adaptive else None,
                "knob_min": e.knob_min if e.adaptive else None,
                "budget_default": round(e.budget_default, 6) if e.budget_default else None,
                "gmacs_per_clip": round(e.gmacs_per_clip, 6) if e.gmacs_per_clip else None,
                "clip_frames": e.clip_frames,
                "frame_size": e.frame_size,
                "clip_fps": e.clip_fps,
            }
            for e in resp.encoder_details
        ],
        "queries": {q.query: list(q.attributes) for q in resp.queries},
        "max_upload_bytes": resp.max_upload_bytes,
        "max_duration_s": resp.max_duration_s,
    }


def encoders_table(described: dict[str, Any]) -> Table:
    """GMACs per clip are without the adaptive module (the full budget's upper bound)."""
    table = Table(title="Clip encoders (vqs analyze --encoder NAME --budget X)", title_justify="left")
    for column in ("encoder", "adaptive", "budget sets", "at 1 / min", "chosen", "GMACs/clip"):
        table.add_column(column)
    for e in described["encoders"]:
        name = e["name"] + (" (default)" if e["name"] == described["default_encoder"] else "")
        if e["adaptive"]:
            row = [e["adaptive"].upper(), e["knob"].split(" ")[0], f"{e['knob_full']} / {e['knob_min']}",
                   f"{e['budget_default']:g}" if e["budget_default"] else "-"]
        else:
            row = ["-", "fixed", "-", "-"]
        cost = f"{e['gmacs_per_clip']:.4g}" if e["gmacs_per_clip"] else "?"
        table.add_row(name, *row, cost)
    knobs = sorted({e["knob"] for e in described["encoders"] if e["adaptive"]})
    table.caption = "; ".join(knobs + ["GMACs/clip: without the adaptive module"])
    return table


def describe(
    server: ServerOption = DEFAULT_SERVER,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Deadline for the call, in seconds.")] = 30.0,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    token: TokenOption = None,
) -> None:
    """List the served queries and clip encoders, with each encoder's compute budget limits."""
    config = config_from_options(server, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
    try:
        with open_channel(config) as channel:
            resp = pb_grpc.VideoAnalyticsStub(channel).DescribeModels(pb.DescribeModelsRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code()
        stderr.print(f"[red]error[/red] {error_message(code, exc.details())}", highlight=False, soft_wrap=True)
        answered = answered_by_gateway(exc)
        if code == grpc.StatusCode.UNAVAILABLE and not answered:
            stderr.print(unreachable_hint(config), highlight=False)
        raise typer.Exit(exit_code_for(code, answered=answered)) from None
    described = describe_dict(resp)
    if as_json:
        sys.stdout.write(json.dumps(described) + "\n")
        return
    stdout.print(encoders_table(described))
    queries = Table(title="Queries", title_justify="left")
    queries.add_column("query")
    queries.add_column("attributes")
    for query, attributes in described["queries"].items():
        shown = ", ".join(attributes[:8]) + (f", ... ({len(attributes)})" if len(attributes) > 8 else "")
        queries.add_row(query, shown)
    stdout.print(queries)
