"""Turn the query decoder's raw outputs into the analysis result (pure functions, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from server.pipeline.decode import VideoInfo
from server.pipeline.segments import FrameResults
from server.triton import EncoderSpec, QuerySpec

__all__ = [
    "AnalysisResult", "Answer", "AttentionMap", "Compute", "Domain", "QuerySpec", "VideoInfo",
    "build_result", "compute",
]


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
class Domain:
    """How much the video's clip features look like the training data of the model that scores
    them (`judge_domain`): higher `score` = more alike, `in_domain` is score >= threshold (a NaN
    score is out of domain)."""

    score: float
    threshold: float
    in_domain: bool


@dataclass(frozen=True)
class Compute:
    """What the encoder spent on a result's clips. `kept_ratio` is the mean over clips of a clip's
    GMACs / `gmacs_full`, the same encoder's GMACs without its adaptive module."""

    encoder: str
    budget: float
    adaptive: str | None  # "sgs" | "ats"; None: fixed compute
    knob: int | None  # B or K the budget set; None: fixed compute
    kept: np.ndarray | None  # int [N, k]: B' (k = 1) or K' per ATS block; None: fixed compute
    gmacs: np.ndarray | None  # float [N] per clip; None: the model does not say
    gmacs_full: float | None  # None: the model does not say

    @property
    def gmacs_per_clip(self) -> float | None:
        return None if self.gmacs is None or not len(self.gmacs) else float(np.mean(self.gmacs))

    @property
    def kept_ratios(self) -> np.ndarray | None:
        """Per clip of an adaptive encoder: its GMACs / gmacs_full; None: fixed compute or not known."""
        if self.adaptive is None or self.gmacs is None or not self.gmacs_full:
            return None
        return self.gmacs / self.gmacs_full

    @property
    def kept_ratio(self) -> float | None:
        """1 for a fixed-compute encoder; None: not known."""
        if self.adaptive is None:
            return 1.0
        ratios = self.kept_ratios
        return None if ratios is None or not len(ratios) else float(np.mean(ratios))


@dataclass(frozen=True)
class AnalysisResult:
    encoder: str
    video: VideoInfo
    clips: int  # clips encoded
    answers: list[Answer]
    attention: list[AttentionMap]
    timing_ms: dict[str, float]
    domain: Domain | None = None  # None: unknown (`judge_domain`)
    compute: Compute | None = None  # None: not accounted (a path that does not report it)
    frames: FrameResults | None = None  # segments and embeddings; None: no per-frame model ran


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
        raise ValueError(f"the query decoder returned no logits for {missing}")
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


def domain(score: float | None, threshold: float | None) -> Domain | None:
    """The in-domain verdict, or None (unknown) unless there are both a score and a threshold."""
    if score is None or threshold is None:
        return None
    return Domain(score=float(score), threshold=float(threshold), in_domain=bool(score >= threshold))


def distance_score(distances: np.ndarray) -> float:
    """The in-domain score of clips from their encoder's per-clip `domain_distance`s: -mean."""
    distances = np.asarray(distances, dtype=np.float64).reshape(-1)
    if not len(distances):
        raise ValueError("no clip distances to score")
    return -float(np.mean(distances))


def judge_domain(
    spec: EncoderSpec, *, distances: np.ndarray | None,
    decoder_score: float | None, decoder_threshold: float | None,
) -> Domain | None:
    """Whether clips `spec` encoded look like its training data; None: unknown. Features are
    judged only by a Gaussian fitted to the same encoder's (another encoder's features score
    differently): its per-clip `distances` against its own threshold; else, for a plain encoder
    without a threshold of its own (the one the decoder was trained with), the decoder's score
    and threshold; else unknown."""
    if spec.domain_scored:
        score = None if distances is None else distance_score(distances)
        return domain(score, spec.in_domain_threshold)
    if spec.adaptive is None and spec.in_domain_threshold is None:
        return domain(decoder_score, decoder_threshold)
    return None


def compute(
    spec: EncoderSpec, budget: float, kept: np.ndarray | None, gmacs: np.ndarray | None
) -> Compute:
    """The compute record of clips `spec` encoded at `budget`, from the model's own per-clip
    `kept` counts and `gmacs` (a fixed-compute encoder's are its constant)."""
    if kept is not None and gmacs is not None and len(kept) != len(gmacs):
        raise ValueError(f"kept counts for {len(kept)} clips but GMACs for {len(gmacs)}")
    adaptive = spec.adaptive
    return Compute(
        encoder=spec.encoder,
        budget=float(budget),
        adaptive=adaptive.kind if adaptive else None,
        knob=adaptive.knob_for(budget) if adaptive else None,
        kept=kept if adaptive else None,
        gmacs=None if gmacs is None else np.asarray(gmacs, dtype=np.float64),
        gmacs_full=spec.gmacs_per_clip,
    )


def build_result(
    *,
    encoder: str,
    specs: Sequence[QuerySpec],
    logits: Mapping[str, np.ndarray],
    attention: np.ndarray,
    spans_s: np.ndarray,
    video: VideoInfo,
    timing_ms: Mapping[str, float],
    domain: Domain | None = None,
    compute: Compute | None = None,
) -> AnalysisResult:
    """The answers and attention maps in the order of `specs`, which is also the order of the
    rows of `attention` (the query decoder's output order)."""
    return AnalysisResult(
        encoder=encoder,
        video=video,
        clips=len(spans_s),
        answers=answers(specs, logits),
        attention=attention_maps([s.query for s in specs], attention, spans_s),
        timing_ms=dict(timing_ms),
        domain=domain,
        compute=compute,
    )
