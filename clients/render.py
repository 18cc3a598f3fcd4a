"""Turn an `AnalyzeResponse` into JSON-ready dicts and rich tables (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from clients import compute, timeline
from server.proto import video_analytics_pb2 as pb

HEAT_LEVELS = " ▁▂▃▄▅▆▇█"
DIGITS = 6


def _r(x: float) -> float:
    return round(float(x), DIGITS)


def response_to_dict(resp: pb.AnalyzeResponse) -> dict[str, Any]:
    """The `vqs analyze --json` object."""
    v = resp.video
    return {
        "video": {
            "duration_s": _r(v.duration_s),
            "fps": _r(v.fps),
            "clips": v.clips,
            "frames": v.frames,
            "width": v.width,
            "height": v.height,
        },
        "answers": [
            {
                "query": a.query,
                "attribute": a.attribute,
                "probability": _r(a.probability),
                "distribution": {k: _r(p) for k, p in sorted(a.distribution.items(), key=lambda kv: -kv[1])},
            }
            for a in resp.answers
        ],
        "attention": [
            {
                "query": att.query,
                "weights": [_r(w) for w in att.weights],
                "clip_spans_s": [[_r(s.start_s), _r(s.end_s)] for s in att.clip_spans],
            }
            for att in resp.attention
        ],
        "timing_ms": {k: round(v, 3) for k, v in sorted(resp.timing_ms.items())},
        "encoder": resp.encoder,
        "request_id": resp.request_id,
    } | ({"domain": {
        "score": _r(resp.domain.score),
        "threshold": _r(resp.domain.threshold),
        "in_domain": resp.domain.in_domain,
    }} if resp.HasField("domain") else {}) | timeline.frames_dict(resp) | compute.compute_dict(resp)


def heatmap(weights: Sequence[float], width: int = 48) -> str:
    """One character per time bin (at most `width`), darker = more attention.

    Bins sum the weights of the clips they cover, then scale to the largest bin.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    n = len(weights)
    if n == 0:
        return ""
    bins = min(n, width)
    sums = [0.0] * bins
    for i, w in enumerate(weights):
        sums[i * bins // n] += max(0.0, float(w))
    top = max(sums)
    if top <= 0:
        return HEAT_LEVELS[0] * bins
    last = len(HEAT_LEVELS) - 1
    return "".join(HEAT_LEVELS[min(last, round(s / top * last))] for s in sums)


def peak_span(weights: Sequence[float], spans: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """The time span of the clip with the most attention."""
    if not weights or len(spans) != len(weights):
        return None
    i = max(range(len(weights)), key=lambda j: weights[j])
    return float(spans[i][0]), float(spans[i][1])


def answers_table(result: dict[str, Any], top: int = 3) -> Table:
    table = Table(title="Answers", title_justify="left")
    table.add_column("query", style="bold")
    table.add_column("answer")
    table.add_column("p", justify="right")
    table.add_column(f"next {top - 1}", style="dim")
    for a in result["answers"]:
        rest = [f"{k} {p:.2f}" for k, p in list(a["distribution"].items()) if k != a["attribute"]]
        table.add_row(a["query"], a["attribute"], f"{a['probability']:.2f}", ", ".join(rest[: top - 1]))
    return table


def attention_table(result: dict[str, Any], width: int = 48) -> Table:
    duration = result["video"]["duration_s"]
    table = Table(title=f"Attention over time (0 – {duration:.1f} s)", title_justify="left")
    table.add_column("query", style="bold")
    table.add_column("heatmap", no_wrap=True)
    table.add_column("peak", justify="right")
    for att in result["attention"]:
        peak = peak_span(att["weights"], att["clip_spans_s"])
        peak_text = f"{peak[0]:.1f}–{peak[1]:.1f} s" if peak else "–"
        table.add_row(att["query"], Text(heatmap(att["weights"], width), style="yellow"), peak_text)
    return table


def summary_line(result: dict[str, Any]) -> str:
    v = result["video"]
    total = result["timing_ms"].get("total")
    took = f", {total / 1000:.2f} s" if total is not None else ""
    return (
        f"{v['duration_s']:.1f} s video, {v['width']}x{v['height']} at {v['fps']:.1f} fps, "
        f"{v['clips']} clips; encoder {result['encoder']}{took}; request {result['request_id']}"
    )


def domain_line(result: dict[str, Any]) -> Text:
    """Whether the video looks like what the models were trained on: out of domain means the
    answers are not to be trusted, whatever their probability. When the server does not say, the
    line says so, since footage unlike the training data then goes unflagged."""
    d = result.get("domain")
    if d is None:
        return Text(f"domain not judged (encoder {result['encoder']} has no in-domain score): "
                    "answers about footage unlike the training data are not flagged", style="yellow")
    if d["in_domain"]:
        return Text(f"in domain (score {d['score']:.2f} >= threshold {d['threshold']:.2f})", style="green")
    return Text(
        f"OUT OF DOMAIN (score {d['score']:.2f} < threshold {d['threshold']:.2f}): the video looks "
        "unlike the training data; the answers below are not reliable", style="bold red")
