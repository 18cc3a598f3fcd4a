"""Turn the decoder's raw outputs into the analysis result (pure functions, no I/O but `load_queries`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DECODER_MODEL = "tqn_decoder"


@dataclass(frozen=True)
class QuerySpec:
    query: str
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class Answer:
    query: str
    attribute: str
    probability: float
    distribution: dict[str, float]


@dataclass(frozen=True)
class AttentionMap:
    query: str
    weights: np.ndarray  # float [N], sums to 1
    spans_s: np.ndarray  # float64 [N, 2], start/end seconds of each clip


@dataclass(frozen=True)
class VideoSummary:
    duration_s: float
    fps: float
    clips: int
    frames: int
    width: int
    height: int


@dataclass(frozen=True)
class AnalysisResult:
    encoder: str
    video: VideoSummary
    answers: list[Answer]
    attention: list[AttentionMap]
    timing_ms: dict[str, float]


def load_queries(model_repository: Path) -> list[QuerySpec]:
    """The decoder's queries and attribute sets, from `tqn_decoder/1/model.json`."""
    path = Path(model_repository) / DECODER_MODEL / "1" / "model.json"
    try:
        meta = json.loads(path.read_text())
        specs = [QuerySpec(q["query"], tuple(q["attributes"])) for q in meta["queries"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the decoder's queries from {path}: {exc}") from exc
    if not specs or any(not s.attributes for s in specs):
        raise ValueError(f"{path}: every query needs a non-empty attribute list")
    return specs


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def answer(spec: QuerySpec, logits: np.ndarray) -> Answer:
    logits = np.asarray(logits).reshape(-1)
    if logits.shape[0] != len(spec.attributes):
        raise ValueError(
            f"query {spec.query!r}: {logits.shape[0]} logits for "
            f"{len(spec.attributes)} attributes {list(spec.attributes)}"
        )
    probs = softmax(logits)
    best = int(np.argmax(probs))
    return Answer(
        query=spec.query,
        attribute=spec.attributes[best],
        probability=float(probs[best]),
        distribution={a: float(p) for a, p in zip(spec.attributes, probs)},
    )


def answers(specs: Sequence[QuerySpec], logits: Mapping[str, np.ndarray]) -> list[Answer]:
    missing = [s.query for s in specs if s.query not in logits]
    if missing:
        raise ValueError(f"the decoder returned no logits for {missing}")
    return [answer(spec, logits[spec.query]) for spec in specs]


def attention_maps(
    order: Sequence[str], attention: np.ndarray, spans_s: np.ndarray
) -> list[AttentionMap]:
    """One map per query (rows of `attention` follow `order`), renormalised over the clips."""
    attention = np.asarray(attention, dtype=np.float64)
    spans_s = np.asarray(spans_s, dtype=np.float64)
    if attention.ndim != 2 or attention.shape[0] != len(order):
        raise ValueError(f"attention must be [{len(order)}, clips], got {list(attention.shape)}")
    if spans_s.shape != (attention.shape[1], 2):
        raise ValueError(
            f"{attention.shape[1]} attention columns but clip spans of shape {list(spans_s.shape)}"
        )
    clipped = np.clip(attention, 0.0, None)
    totals = clipped.sum(axis=1, keepdims=True)
    uniform = np.full_like(clipped, 1.0 / max(clipped.shape[1], 1))
    weights = np.where(totals > 0, clipped / np.where(totals > 0, totals, 1.0), uniform)
    return [AttentionMap(query=q, weights=weights[i], spans_s=spans_s) for i, q in enumerate(order)]


def build_result(
    *,
    encoder: str,
    specs: Sequence[QuerySpec],
    logits: Mapping[str, np.ndarray],
    attention_order: Sequence[str],
    attention: np.ndarray,
    spans_s: np.ndarray,
    video: VideoSummary,
    timing_ms: Mapping[str, float],
) -> AnalysisResult:
    maps = {m.query: m for m in attention_maps(attention_order, attention, spans_s)}
    return AnalysisResult(
        encoder=encoder,
        video=video,
        answers=answers(specs, logits),
        attention=[maps[s.query] for s in specs if s.query in maps],
        timing_ms=dict(timing_ms),
    )
