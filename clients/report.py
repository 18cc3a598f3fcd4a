"""`vqs render RESULT.json --video PATH --out report.png`: one picture of what the model saw.

Top to bottom, on one time axis in seconds: a strip of frames (each drawn over the stretch of
time it stands for), one attention heatmap row per query (each clip's weight over its span,
scaled to the row's peak: bright = where the model looked for that query), and on the right of
each row the answer with its probability and the runners-up; last, when the result has them, the
action parser's segments (one colour per pattern, its id written in) and boundaries.

Needs the `render` extra (matplotlib); frames are read with PyAV, which the package installs.
Both are imported when a picture is made, so the other commands never load them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

FIG_WIDTH_IN = 13.0
DPI = 100
STRIP_HEIGHT_IN = 1.2
ROW_HEIGHT_IN = 0.42
MAX_FRAMES = 16
CMAP = "inferno"


@dataclass(frozen=True)
class Box:
    """A panel's pixel box in the saved PNG (origin top-left, y down)."""
    left: int
    top: int
    right: int
    bottom: int


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    strip: Box
    rows: dict[str, Box]  # query -> its heatmap row
    duration_s: float
    segments: Box | None = None  # the sub-action row, when the result has segments


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise typer.BadParameter(
            "pictures need matplotlib: pip install 'vqs[render]'", param_hint="--png/--out"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_result(path: Path, item_id: str | None = None) -> dict[str, Any]:
    """An `vqs analyze --json` object, or a line of a `vqs score` JSONL (the only one, or --id's)."""
    text = path.read_text()
    try:
        rows = [json.loads(text)]
    except ValueError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if item_id is not None:
        rows = [r for r in rows if r.get("id") == item_id]
        if not rows:
            raise ValueError(f"no line with id {item_id!r} in {path}")
    if len(rows) != 1:
        raise ValueError(f"{path} holds {len(rows)} results; pick one with --id")
    row = rows[0]
    if "error" in row and "result" not in row:
        raise ValueError(f"{row.get('id', path)} has no result: {row['error'].get('code')} "
                         f"{row['error'].get('message')}")
    result = row.get("result", row)
    if "attention" not in result or "video" not in result:
        raise ValueError(f"{path} is not a `vqs analyze --json` result or a `vqs score` line")
    return result


def frames_at(video: Path, times: list[float]):
    """The decoded frame (RGB array) shown at each time: for each, a seek to the keyframe before
    it and decoding up to it, so a long video is not decoded whole. None where nothing decodes."""
    import av

    picked: list[Any] = []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for t in times:
            frame_rgb = None
            try:
                if stream.time_base:
                    container.seek(int(t / stream.time_base), stream=stream, backward=True)
                for frame in container.decode(stream):
                    if frame_rgb is not None and frame.time is not None and frame.time > t:
                        break
                    frame_rgb = frame.to_ndarray(format="rgb24")
            except (av.FFmpegError, ValueError, OverflowError):
                pass
            picked.append(frame_rgb)
    return picked


def render_report(result: dict[str, Any], video: Path | None, out: Path, *, title: str = "") -> Layout:
    """Draw the report for `result` (frames from `video`, if given) into `out` (PNG)."""
    plt = require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    info = result["video"]
    duration = max(float(info["duration_s"]), 1e-3)
    attention = result["attention"]
    answers = {a["query"]: a for a in result["answers"]}
    segments = result.get("segments") or []
    n_rows = len(attention) + (1 if segments else 0)
    height_in = 0.9 + STRIP_HEIGHT_IN + ROW_HEIGHT_IN * n_rows + 0.55
    fig = plt.figure(figsize=(FIG_WIDTH_IN, height_in), dpi=DPI)
    left, right = 0.11, 0.70
    top_in, strip_in, row_in = 0.9, STRIP_HEIGHT_IN, ROW_HEIGHT_IN

    def axes_at(y_in: float, h_in: float):
        return fig.add_axes((left, 1 - (y_in + h_in) / height_in, right - left, h_in / height_in))

    fig.text(0.01, 1 - 0.3 / height_in, title or "vqs analysis", fontsize=13, weight="bold", va="center")
    fig.text(
        0.01, 1 - 0.62 / height_in,
        f"{duration:.1f} s, {info['width']}x{info['height']} at {info['fps']:.1f} fps, "
        f"{info['clips']} clips; encoder {result.get('encoder', '?')}; "
        "rows: attention per clip, scaled to each query's peak (bright = looked here)",
        fontsize=9, va="center", color="0.3",
    )
    domain = result.get("domain")
    if domain is not None:
        fig.text(
            0.99, 1 - 0.3 / height_in,
            "in domain" if domain["in_domain"] else "OUT OF DOMAIN: answers not reliable",
            fontsize=11, weight="bold", ha="right", va="center",
            color="tab:green" if domain["in_domain"] else "tab:red",
        )

    strip = axes_at(top_in, strip_in)
    strip.set_xlim(0, duration)
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    strip.tick_params(labelbottom=False)
    strip.set_ylabel("frames", rotation=0, ha="right", va="center")
    # As many frames as fit at the video's aspect ratio, each standing for an equal stretch of time.
    aspect = (info["width"] / info["height"]) if info.get("width") and info.get("height") else 4 / 3
    strip_width_in = FIG_WIDTH_IN * (right - left)
    count = max(1, min(MAX_FRAMES, round(strip_width_in / (strip_in * aspect))))
    slot = duration / count
    times = [slot * (k + 0.5) for k in range(count)]
    images = frames_at(video, times) if video is not None else [None] * count
    for k, image in enumerate(images):
        if image is not None:
            strip.imshow(image, extent=(k * slot, (k + 1) * slot, 0, 1), aspect="auto",
                         interpolation="bilinear")
        strip.axvline(k * slot, color="white", linewidth=1.5)
    strip.set_xlim(0, duration)

    cmap = colormaps[CMAP]
    row_axes = {}
    for r, att in enumerate(attention):
        ax = axes_at(top_in + strip_in + r * row_in, row_in)
        ax.set_facecolor(cmap(0.0))
        weights = [max(0.0, float(w)) for w in att["weights"]]
        peak = max(weights, default=0.0) or 1.0
        for w, (start, end) in zip(weights, att["clip_spans_s"]):
            ax.add_patch(Rectangle((start, 0), max(end - start, 1e-6), 1, color=cmap(w / peak), linewidth=0))
        ax.set_xlim(0, duration)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_ylabel(att["query"], rotation=0, ha="right", va="center", fontsize=10)
        last = r == len(attention) - 1 and not segments
        ax.tick_params(labelbottom=last)
        if last:
            ax.set_xlabel("time (s)")
        a = answers.get(att["query"])
        if a is not None:
            rest = [f"{k} {p:.2f}" for k, p in a["distribution"].items() if k != a["attribute"]][:2]
            ax.text(1.015, 0.70, f"{a['attribute']}  {a['probability']:.2f}", transform=ax.transAxes,
                    fontsize=10, weight="bold", va="center")
            ax.text(1.015, 0.24, "then " + ", ".join(rest) if rest else "", transform=ax.transAxes,
                    fontsize=8, va="center", color="0.4")
        row_axes[att["query"]] = ax
    segments_ax = None
    if segments:
        segments_ax = axes_at(top_in + strip_in + len(attention) * row_in, row_in)
        palette = colormaps["tab10"]
        for s in segments:
            start, end = float(s["start_s"]), float(s["end_s"])
            segments_ax.add_patch(Rectangle((start, 0), max(end - start, 1e-6), 1,
                                            color=palette(s["pattern"] % 10), linewidth=0))
            segments_ax.text((start + end) / 2, 0.5, str(s["pattern"]), ha="center", va="center",
                             fontsize=8, color="white", clip_on=True)
        for b in result.get("boundaries_s") or []:
            segments_ax.axvline(float(b), color="black", linewidth=1.2)
        segments_ax.set_xlim(0, duration)
        segments_ax.set_ylim(0, 1)
        segments_ax.set_yticks([])
        segments_ax.set_ylabel("sub-actions", rotation=0, ha="right", va="center", fontsize=10)
        segments_ax.set_xlabel("time (s)")
        segments_ax.text(1.015, 0.5, f"{len(segments)} segments (parser patterns)", transform=segments_ax.transAxes,
                         fontsize=9, va="center", color="0.4")

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    width, height = fig.canvas.get_width_height()

    def box(ax) -> Box:
        b = ax.get_window_extent()
        return Box(round(b.x0), round(height - b.y1), round(b.x1), round(height - b.y0))

    layout = Layout(width, height, box(strip), {q: box(ax) for q, ax in row_axes.items()}, duration,
                    box(segments_ax) if segments_ax is not None else None)
    plt.close(fig)
    return layout


def render(
    result_path: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, readable=True, metavar="RESULT.json",
        help="`vqs analyze --json` output, or a `vqs score` JSONL (one line, or pick with --id).")],
    out: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, help="PNG to write.")] = Path("report.png"),
    video: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True,
        help="The analysed video, for the frame strip (default: a `vqs score` line's source).")] = None,
    item_id: Annotated[str | None, typer.Option("--id", help="Which line of a `vqs score` JSONL.")] = None,
) -> None:
    """Draw frames over time, per-query attention heatmaps and the answers into one PNG."""
    try:
        result = load_result(result_path, item_id)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="RESULT.json") from None
    if video is None and item_id is not None:
        source = json.loads(next(
            line for line in result_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("id") == item_id))["source"]
        video = Path(source) if Path(source).is_file() else None
    render_report(result, video, out, title=(video.name if video else result_path.name))
    typer.echo(str(out))
