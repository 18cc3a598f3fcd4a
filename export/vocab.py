"""Queries, attribute sets and the valid global classes: the label space of every model.

Exported into each decoder's model.json, which is what the gateway reads; nothing in `server/`
imports this module.
"""

from __future__ import annotations

import itertools

import numpy as np

QUERIES: tuple[str, ...] = ("take_off", "somersaults", "twists", "flight_pose")
GLOBAL_QUERY = "class"
NULL = "null"

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "take_off": ("backward", "forward", "reverse", "inward"),
    "somersaults": ("1", "1.5", "2", "2.5", "3"),
    "twists": ("0", "0.5", "1", "1.5", "2"),
    "flight_pose": ("tuck", "pike", "straight", "free"),
}

FLIGHT_COMBOS = 12
_CLASS_SEED = 48


def _valid_classes() -> tuple[tuple[str, ...], ...]:
    """48 valid combinations, like Diving48: 12 flights, each with every take-off.

    Every flight (somersaults, twists, pose) occurs with all four take-offs, so the class can only be
    answered by combining the take-off moment with the flight, which happen in different clips.
    """
    flights = list(
        itertools.product(ATTRIBUTES["somersaults"], ATTRIBUTES["twists"], ATTRIBUTES["flight_pose"])
    )
    rng = np.random.default_rng(_CLASS_SEED)

    def imbalance(chosen: list[tuple[str, ...]]) -> int:
        counts = [np.bincount([ATTRIBUTES[q].index(c[k]) for c in chosen], minlength=len(ATTRIBUTES[q]))
                  for k, q in enumerate(QUERIES[1:])]
        return sum(int(c.max() - c.min()) for c in counts) + 100 * sum(int((c == 0).sum()) for c in counts)

    candidates = ([flights[i] for i in rng.choice(len(flights), FLIGHT_COMBOS, replace=False)]
                  for _ in range(2000))
    chosen = min(candidates, key=imbalance)
    chosen.sort(key=lambda c: tuple(ATTRIBUTES[q].index(v) for q, v in zip(QUERIES[1:], c)))
    return tuple((take_off, *flight) for flight in chosen for take_off in ATTRIBUTES["take_off"])


CLASSES: tuple[tuple[str, ...], ...] = _valid_classes()
CLASS_NAMES: tuple[str, ...] = tuple("/".join(c) for c in CLASSES)


def head_attributes() -> dict[str, tuple[str, ...]]:
    """Output attribute set of every query head, in head order, each ending with "null"."""
    heads = {q: (*ATTRIBUTES[q], NULL) for q in QUERIES}
    heads[GLOBAL_QUERY] = (*CLASS_NAMES, NULL)
    return heads


def class_name(attributes: dict[str, str]) -> str:
    return "/".join(attributes[q] for q in QUERIES)


def label_indices(labels: dict) -> dict[str, int]:
    """Map a labels.jsonl record to the target index of each head."""
    heads = head_attributes()
    return {q: heads[q].index(labels[q]) for q in heads}
