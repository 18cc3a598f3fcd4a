"""`vqs search QUERY.png VIDEOS...` or `vqs search --at VIDEO:SECONDS VIDEOS...`: the frames of
the videos most like a query frame, by cosine similarity of the frame embeddings.

A picture has no neighbouring frames, while the embedder reads motion from a few around each
frame: the picture is sent as a one-second still video, and its middle frame is compared by the
embedder's context-free features when the server returns them (a still's contextual embedding
looks like the idle run-up), else by its embedding. A frame of a video (`--at`) is embedded in its
own video, as the frames it is compared with are."""

from __future__ import annotations

import io
import json
import sys
from fractions import Fraction
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

STILL_FPS = 15
STILL_FRAMES = 15

stdout = Console()
stderr = Console(stderr=True)


def parse_at(value: str) -> tuple[Path, float]:
    """"VIDEO:SECONDS" -> (path, seconds); `typer.BadParameter` says what is wrong."""
    path, sep, seconds = value.rpartition(":")
    if not sep or not path:
        raise typer.BadParameter(f"{value!r} is not VIDEO:SECONDS (e.g. dive.mp4:2.5)", param_hint="--at")
    try:
        t = float(seconds)
    except ValueError:
        raise typer.BadParameter(f"{seconds!r} is not a number of seconds", param_hint="--at") from None
    if not 0 <= t < float("inf"):
        raise typer.BadParameter(f"{seconds} is not a time in the video (seconds >= 0)", param_hint="--at")
    if not Path(path).is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="--at")
    return Path(path), t


def still_video(image: Path) -> bytes:
    """A picture as an H.264 MP4 of STILL_FRAMES identical frames; `typer.BadParameter` when it
    is not a picture PyAV can read."""
    import av

    try:
        with av.open(str(image)) as container:
            kind = container.format.name  # pictures: image2 or an image pipe (png_pipe, jpeg_pipe, ...)
            if kind != "image2" and not kind.endswith("_pipe"):
                raise ValueError(f"it is a {kind} file; give a picture, or --at VIDEO:SECONDS for a video's frame")
            frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (av.FFmpegError, StopIteration, IndexError, ValueError) as exc:
        raise typer.BadParameter(f"{image} is not a picture (PNG or JPEG): {exc}", param_hint="QUERY") from None
    height, width = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2  # yuv420p needs even sides
    if height < 2 or width < 2:
        raise typer.BadParameter(f"{image} is too small ({frame.shape[1]}x{frame.shape[0]} px)", param_hint="QUERY")
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(STILL_FPS), options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        picture = av.VideoFrame.from_ndarray(frame[:height, :width].copy(), format="rgb24")
        for _ in range(STILL_FRAMES):
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return out.getvalue()


def rank(query, videos: list[VideoFrames], *, top: int, gap_s: float, by_features: bool = False,
         exclude: tuple[str, float] | None = None) -> list[dict[str, Any]]:
    """The `top` frames most like `query` across `videos` (at most one per `gap_s` of a video),
    best first, by their embeddings or (`by_features`) their context-free features; `exclude` =
    (video name, time): skip that frame's own neighbourhood."""
    from clients import embeddings

    found = []
    for video in videos:
        fps = 1.0 / max(float(video.times_s[1] - video.times_s[0]), 1e-6) if len(video.times_s) > 1 else 1.0
        gap = max(1, round(gap_s * fps))
        frames = video.features if by_features else video.embeddings
        for index, score in embeddings.nearest_frames(query, frames, top + 1, gap):
            t = float(video.times_s[index])
            if exclude and exclude[0] == video.name and abs(t - exclude[1]) < gap_s:
                continue
            row = {"video": video.name, "time_s": round(t, 4), "similarity": round(score, 6)}
            if video.segments:
                row["pattern"] = timeline.pattern_at(video.segments, t)
            found.append(row)
    return sorted(found, key=lambda r: -r["similarity"])[:top]


def search(
    items: Annotated[list[Path] | None, typer.Argument(
        metavar="[QUERY] VIDEOS...", show_default=False,
        help="The query picture (unless --at is given), then the videos to search.")] = None,
    at: Annotated[str | None, typer.Option(
        "--at", metavar="VIDEO:SECONDS", help="Query with the frame of VIDEO at SECONDS instead of a picture.")] = None,
    top: Annotated[int, typer.Option(min=1, help="How many frames to list.")] = 5,
    gap_s: Annotated[float, typer.Option(min=0.0, help="At most one hit per this many seconds of a video.")] = 0.5,
    server: ServerOption = DEFAULT_SERVER,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    timeout: Annotated[float | None, typer.Option(min=0.1, help="Deadline per video, in seconds.")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Refuse files larger than this many MB.")] = 256.0,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    token: TokenOption = None,
) -> None:
    """Find the frames of VIDEOS most like a query picture or a video's frame."""
    from clients import embeddings

    items = items or []
    query_at = parse_at(at) if at is not None else None
    if query_at is None and not items:
        raise typer.BadParameter("give a query picture and videos, or --at VIDEO:SECONDS and videos",
                                 param_hint="[QUERY] VIDEOS...")
    picture, videos = (None, items) if query_at else (items[0], items[1:])
    if not videos:
        raise typer.BadParameter("no videos to search", param_hint="VIDEOS...")
    for path in [picture, *videos]:
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint="[QUERY] VIDEOS...")
    still = still_video(picture) if picture is not None else None
    config = config_from_options(server, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)

    fetched: dict[Path, VideoFrames] = {}

    def frames_of(path: Path) -> VideoFrames:
        if path.resolve() not in fetched:
            with stderr.status(f"embedding {path.name} on {server}"):
                data = embeddings.read_video(path, max_upload_mb)
                fetched[path.resolve()] = embeddings.fetch(config, str(path), data, segments=True,
                                                           timeout=timeout, max_upload_mb=max_upload_mb)
        return fetched[path.resolve()]

    exclude, by_features = None, False
    if query_at is not None:
        source, t = query_at
        video = frames_of(source)
        if t > video.duration_s:
            raise typer.BadParameter(f"{source} is {video.duration_s:.2f} s long; {t:g} s is past its end",
                                     param_hint="--at")
        query = video.embeddings[video.frame_at(t)]
        described = {"video": str(source), "time_s": t}
        exclude = (video.name, float(video.times_s[video.frame_at(t)]))
    else:
        with stderr.status(f"embedding {picture.name} on {server}"):
            still_frames = embeddings.fetch(config, str(picture), still, segments=False, timeout=timeout,
                                            max_upload_mb=max_upload_mb)
        searched = [frames_of(p) for p in videos]
        # A still's embeddings look idle (no motion); compare context-free features when served.
        by_features = still_frames.features is not None and all(v.features is not None for v in searched)
        middle = len(still_frames.times_s) // 2
        query = still_frames.features[middle] if by_features else still_frames.embeddings[middle]
        described = {"picture": str(picture), "by": "features" if by_features else "embeddings"}
    hits = rank(query, [frames_of(p) for p in videos], top=top, gap_s=gap_s, exclude=exclude,
                by_features=by_features)
    if as_json:
        sys.stdout.write(json.dumps({"query": described, "results": hits}) + "\n")
        return
    table = Table(title=f"Frames most like {described.get('picture') or f'{at}'}", title_justify="left")
    for column in ("#", "video", "time s", "similarity", "pattern"):
        table.add_column(column, justify="left" if column == "video" else "right")
    for i, hit in enumerate(hits, 1):
        table.add_row(str(i), hit["video"], f"{hit['time_s']:.2f}", f"{hit['similarity']:.3f}",
                      str(hit.get("pattern", "–")))
    stdout.print(table)
