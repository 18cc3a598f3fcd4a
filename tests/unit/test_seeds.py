"""The seeds study's aggregation and table, on made-up per-seed results."""

from __future__ import annotations

import numpy as np
import pytest

from export import seeds, train


def _summary(accuracy: float) -> dict:
    return {"accuracy": {q: accuracy for q in train.HEADS}, "per_class_accuracy": accuracy,
            "by_length": {"2-8s": {"videos": 3, "somersaults": accuracy, "twists": accuracy, "class": accuracy},
                          "14-21s": {"videos": 0, "somersaults": None, "twists": None, "class": None}}}


def _hits(rate: float, n: int = 40) -> dict[str, np.ndarray]:
    return {q: np.arange(n) < rate * n for q in train.HEADS}


def test_aggregate_takes_mean_and_std_over_seeds_and_pairs_tqn_with_each_baseline():
    per_seed = {s: {"tqn": _summary(acc), "average_pooling": _summary(0.5), "short_term": _summary(0.25)}
                for s, acc in ((1, 0.7), (2, 0.9))}
    hits = {s: {"tqn": _hits(acc), "average_pooling": _hits(0.5), "short_term": _hits(0.25)}
            for s, acc in ((1, 0.7), (2, 0.9))}

    study = seeds.aggregate(per_seed, hits)

    tqn = study["models"]["tqn"]["accuracy"]["twists"]
    assert tqn["mean"] == pytest.approx(0.8) and tqn["std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert study["models"]["short_term"]["accuracy"]["class"]["std"] == 0
    gap = study["tqn_minus"]["short_term"]["class"]
    assert gap["difference"] == pytest.approx(0.8 - 0.25)
    assert gap["interval95"][0] <= gap["difference"] <= gap["interval95"][1]
    # A length bin without videos stays undefined instead of counting as 0%.
    assert np.isnan(study["models"]["tqn"]["by_length"]["14-21s"]["class"]["mean"])

    table = seeds.markdown(study, (1, 2), 40)
    assert "80.0 ± 14.1" in table and "+55.0 [" in table
    assert "By video length" in table and "2-8s" in table


def test_only_the_seed_vqs_models_trained_is_taken_from_its_saved_models(tmp_path):
    other = next(s for s in seeds.SEEDS if s != seeds.build.TRAIN_SEED)
    assert seeds._saved_models(tmp_path, train.Budget(), other) is None
    assert seeds._saved_models(tmp_path, train.Budget(), seeds.build.TRAIN_SEED) is None  # none saved
