"""The action parser's segments and the frame embeddings of an `AnalyzeResponse`: as JSON-ready
dicts (embeddings as a packed tensor: base64 bytes + shape + dtype; `clients.similarity` reads
them back) and drawn as a timeline in the terminal (pure functions, no numpy: `vqs analyze` stays
light)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from rich.table import Table
from rich.text import Text

from server.proto import video_analytics_pb2 as pb

PATTERN_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_white", "bright_black")


def packed_doubles(values) -> dict[str, Any]:
    """Floats as a packed float64 tensor ({"dtype", "shape", "data": base64 little-endian})."""
    values = list(values)
    data = struct.pack(f"<{len(values)}d", *values)
    return {"dtype": "float64", "shape": [len(values)], "data": base64.b64encode(data).decode("ascii")}


def frames_dict(resp: pb.AnalyzeResponse) -> dict[str, Any]:
    """The `segments` and `boundaries_s` keys of `vqs analyze --json`, and `embeddings` when the
    response has them ({"values": packed [frames, dim], "times_s": packed [frames], "fps", and
    "features" packed [frames, dim] when the embedder gives context-free features too})."""
    out: dict[str, Any] = {
        "segments": [
            {"start_s": round(s.start_s, 6), "end_s": round(s.end_s, 6), "pattern": s.pattern,
             "confidence": round(s.confidence, 6)}
            for s in resp.segments
        ],
        "boundaries_s": [round(b, 6) for b in resp.boundaries_s],
    }
    if resp.HasField("embeddings"):
        e = resp.embeddings
        out["embeddings"] = {
            "values": {"dtype": e.values.dtype, "shape": list(e.values.shape),
                       "data": base64.b64encode(e.values.data).decode("ascii")},
            "times_s": packed_doubles(e.times_s),
            "fps": e.fps,
        }
        if e.HasField("features"):
            out["embeddings"]["features"] = {"dtype": e.features.dtype, "shape": list(e.features.shape),
                                             "data": base64.b64encode(e.features.data).decode("ascii")}
    return out


def pattern_at(segments: list[dict[str, Any]], t: float) -> int | None:
    """The pattern of the segment holding time t (None: outside every segment)."""
    for s in segments:
        if s["start_s"] <= t < s["end_s"]:
            return s["pattern"]
    return None


def pattern_strip(segments: list[dict[str, Any]], start_s: float, end_s: float, width: int) -> Text:
    """One character per time bin: the pattern id (0-9, then letters) of the segment at the bin's
    centre, coloured per pattern; '·' where no segment is."""
    text = Text()
    span = max(end_s - start_s, 1e-9)
    for i in range(width):
        p = pattern_at(segments, start_s + (i + 0.5) * span / width)
        if p is None:
            text.append("·", style="dim")
        else:
            text.append("0123456789abcdefghijklmnopqrstuvwxyz"[p % 36], style=PATTERN_COLOURS[p % len(PATTERN_COLOURS)])
    return text


def boundary_strip(boundaries_s: list[float], start_s: float, end_s: float, width: int) -> str:
    span = max(end_s - start_s, 1e-9)
    cells = [" "] * width
    for b in boundaries_s:
        cells[min(width - 1, max(0, int((b - start_s) / span * width)))] = "|"
    return "".join(cells)


def timeline_table(result: dict[str, Any], width: int = 48) -> Table | None:
    """Segments over the video's time (one character per 48th of it), boundaries under them,
    and each segment's span; None when the result has no segments."""
    segments = result.get("segments") or []
    if not segments:
        return None
    start, end = 0.0, max(result["video"]["duration_s"], segments[-1]["end_s"])
    table = Table(title=f"Sub-actions over time (0 – {end:.1f} s; digit = parser pattern)", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("timeline", no_wrap=True)
    table.add_column("", justify="right")
    table.add_row("segments", pattern_strip(segments, start, end, width), f"{len(segments)}")
    table.add_row("boundaries", Text(boundary_strip(result["boundaries_s"], start, end, width), style="bold"),
                  ", ".join(f"{b:.2f}" for b in result["boundaries_s"][:6])
                  + (" ..." if len(result["boundaries_s"]) > 6 else ""))
    return table


def segments_table(result: dict[str, Any]) -> Table:
    table = Table(title="Segments", title_justify="left")
    for column in ("start s", "end s", "pattern", "confidence"):
        table.add_column(column, justify="right")
    for s in result.get("segments") or []:
        table.add_row(f"{s['start_s']:.2f}", f"{s['end_s']:.2f}", str(s["pattern"]), f"{s['confidence']:.2f}")
    return table
