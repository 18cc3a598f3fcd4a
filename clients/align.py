"""`vqs align A B`: match the moments of two performances by dynamic time warping over their
per-frame embeddings, and say how well their sub-actions line up."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from clients import timeline
from clients.channel import (
    DEFAULT_SERVER, ServerOption, TlsCaOption, TlsCertOption, TlsKeyOption, TokenOption, config_from_options,
)

if TYPE_CHECKING:  # numpy loads only when the command runs: `vqs analyze` stays light
    from clients.embeddings import VideoFrames

stdout = Console()
stderr = Console(stderr=True)


def alignment(a: VideoFrames, b: VideoFrames) -> dict[str, Any]:
    """The DTW path between the two embedding sequences (as frame-time pairs), its mean
    similarity, where A's boundaries (or, without segments, A's whole seconds) land in B, and the
    phase agreement: the share of matched frame pairs whose parser patterns agree (None when a
    video has no segments)."""
    import numpy as np

    from clients import embeddings

    stride = embeddings.stride_for(len(a.times_s), len(b.times_s))
    ea, eb = a.embeddings[::stride], b.embeddings[::stride]
    sim = embeddings.similarity(ea, eb)
    path = np.asarray(embeddings.dtw(1.0 - sim))
    ia, ib = path[:, 0] * stride, path[:, 1] * stride
    ta, tb = a.times_s[ia], b.times_s[ib]

    def in_b(t: float) -> float:
        """B's time matched to A's frame at t (the median when the path holds it for a while)."""
        frame = a.frame_at(t)
        rows = np.flatnonzero(np.abs(ia - frame) == np.abs(ia - frame).min())
        return float(np.median(tb[rows]))

    agreement = None
    if a.segments and b.segments:
        same = [timeline.pattern_at(a.segments, x) == timeline.pattern_at(b.segments, y) for x, y in zip(ta, tb)]
        agreement = float(np.mean(same))
    anchors = a.boundaries_s if a.boundaries_s else [float(t) for t in np.arange(0.0, a.duration_s, 1.0)]
    matched = []
    for t in anchors:
        u = in_b(t)
        row = {"a_s": round(t, 4), "b_s": round(u, 4)}
        if a.segments and b.segments:
            row |= {"a_pattern": timeline.pattern_at(a.segments, t), "b_pattern": timeline.pattern_at(b.segments, u)}
        if b.boundaries_s:
            row["b_nearest_boundary_s"] = round(min(b.boundaries_s, key=lambda x: abs(x - u)), 4)
        matched.append(row)
    return {
        "a": a.name, "b": b.name,
        "frames": [len(a.times_s), len(b.times_s)], "stride": stride,
        "mean_similarity": round(float(sim[path[:, 0], path[:, 1]].mean()), 6),
        "phase_agreement": None if agreement is None else round(agreement, 6),
        "matched": matched,
        "path_s": [[round(float(x), 4), round(float(y), 4)] for x, y in zip(ta, tb)],
    }


def matched_table(result: dict[str, Any]) -> Table:
    by_boundary = any("b_nearest_boundary_s" in row for row in result["matched"])
    table = Table(title="A's boundaries in B" if by_boundary else "A's seconds in B", title_justify="left")
    for column in ("A s", "B s", "A pattern", "B pattern", "B's nearest boundary s"):
        table.add_column(column, justify="right")
    for row in result["matched"]:
        table.add_row(f"{row['a_s']:.2f}", f"{row['b_s']:.2f}", str(row.get("a_pattern", "–")),
                      str(row.get("b_pattern", "–")),
                      f"{row['b_nearest_boundary_s']:.2f}" if "b_nearest_boundary_s" in row else "–")
    return table


def align(
    video_a: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, metavar="A",
                                            help="First video.")],
    video_b: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, metavar="B",
                                            help="Second video.")],
    server: ServerOption = DEFAULT_SERVER,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    timeout: Annotated[float | None, typer.Option(min=0.1, help="Deadline per video, in seconds.")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Refuse files larger than this many MB.")] = 256.0,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    token: TokenOption = None,
) -> None:
    """Align two videos of the same kind of action: matched times and phase agreement."""
    from clients import embeddings

    config = config_from_options(server, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
    videos = []
    for path in (video_a, video_b):
        with stderr.status(f"embedding {path.name} on {server}"):
            data = embeddings.read_video(path, max_upload_mb)
            videos.append(embeddings.fetch(config, str(path), data, segments=True, timeout=timeout,
                                           max_upload_mb=max_upload_mb))
    result = alignment(*videos)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    agreement = result["phase_agreement"]
    stdout.print(
        f"{video_a.name} ({result['frames'][0]} frames) ~ {video_b.name} ({result['frames'][1]} frames): "
        f"mean similarity along the path {result['mean_similarity']:.3f}; phase agreement "
        + (f"{agreement:.1%}" if agreement is not None else "unknown (no segments: the parser is not served)"),
        highlight=False, soft_wrap=True)
    stdout.print(matched_table(result))
