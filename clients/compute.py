"""What the encoder spent on an `AnalyzeResponse` (its `compute`): as the JSON-ready dict of
`vqs analyze --json` and as a terminal table (pure functions)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.table import Table

from server.proto import video_analytics_pb2 as pb

KNOB_NAMES = {"sgs": "B", "ats": "K"}


def compute_dict(resp: pb.AnalyzeResponse) -> dict[str, Any]:
    """The `compute` key (absent when the server does not report it): per clip, what it kept
    (SGS: [B'], ATS: K' per ATS block) and its GMACs."""
    if not resp.HasField("compute"):
        return {}
    c = resp.compute
    return {"compute": {
        "encoder": c.encoder,
        "budget": round(c.budget, 6),
        "adaptive": c.adaptive or None,
        "knob": c.knob if c.adaptive else None,
        "kept_ratio": round(c.kept_ratio, 6),
        "gmacs_per_clip": round(c.gmacs_per_clip, 6),
        "clips": [{"kept": list(clip.kept), "gmacs": round(clip.gmacs, 6)} for clip in c.clips],
    }}


def _spread(values: list[int]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.1f} ({min(values)}-{max(values)})"


def compute_table(result: dict[str, Any]) -> Table | None:
    """How much of the encoder ran: budget, knob, GMACs per clip, kept ratio, and what the clips
    kept (SGS: how many clips kept each B'; ATS: mean and range of K' per block)."""
    compute = result.get("compute")
    if compute is None:
        return None
    table = Table(title="Compute", title_justify="left", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("encoder", compute["encoder"] + (f" ({compute['adaptive'].upper()})" if compute["adaptive"] else
                                                   " (fixed compute)"))
    if compute["adaptive"]:
        knob = KNOB_NAMES.get(compute["adaptive"], "knob")
        table.add_row("budget", f"{compute['budget']:g} -> {knob} = {compute['knob']}")
    gmacs = compute["gmacs_per_clip"]
    table.add_row("GMACs per clip", f"{gmacs:.4g}" if gmacs else "not reported by the model")
    table.add_row("kept ratio", f"{compute['kept_ratio']:.3f} of the encoder's work without its adaptive module"
                  if compute["adaptive"] else "1 (nothing adaptive)")
    kept = [clip["kept"] for clip in compute["clips"]]
    if compute["adaptive"] == "sgs" and kept:
        counts = Counter(k[0] for k in kept)
        table.add_row("B' per clip", "  ".join(f"{b}: {counts[b]} clips" for b in sorted(counts)))
    elif compute["adaptive"] == "ats" and kept:
        for block in range(len(kept[0])):
            table.add_row(f"K' ATS block {block + 1}", _spread([k[block] for k in kept]))
    return table
