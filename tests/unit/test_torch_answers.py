"""export.torch_answers writes the torch answers in the form `vqs evaluate --against` pairs."""

from __future__ import annotations

import numpy as np
import pytest

from clients.evaluate import compare
from export.torch_answers import answer_rows

HEADS = {"somersaults": ("1", "2", "null"), "flight_pose": ("tuck", "pike", "null")}


def _records() -> list[dict]:
    return [{"file": "a.mp4", "somersaults": "2", "flight_pose": "tuck"},
            {"file": "b.mp4", "somersaults": "1", "flight_pose": "pike"}]


def test_rows_take_the_arg_max_and_the_temperature_scaled_top_probability():
    logits = {"somersaults": np.array([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]]),
              "flight_pose": np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])}
    rows = answer_rows(_records(), logits, {"somersaults": 0.5, "flight_pose": 1.0}, HEADS)

    assert [r["id"] for r in rows] == ["a.mp4", "b.mp4"]
    assert rows[0]["labels"] == {"somersaults": "2", "flight_pose": "tuck"}
    assert [r["answers"]["somersaults"] for r in rows] == ["2", "1"]
    assert rows[1]["answers"]["flight_pose"] == "null"
    # Temperature 0.5 doubles the logits: softmax([0, 4, -2]) at the top.
    assert rows[0]["confidence"]["somersaults"] == pytest.approx(1 / (1 + np.exp(-4) + np.exp(-6)))
    assert rows[0]["confidence"]["flight_pose"] == pytest.approx(np.exp(3) / (np.exp(3) + 2))


def test_rows_pair_with_served_results_in_vqs_evaluate():
    logits = {"somersaults": np.array([[0.0, 2.0, -1.0], [3.0, 0.0, 0.0]]),
              "flight_pose": np.array([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])}
    torch_rows = answer_rows(_records(), logits, {q: 1.0 for q in HEADS}, HEADS)
    served = [dict(row, answers={**row["answers"], "somersaults": "2"}) for row in torch_rows]

    paired = compare(served, torch_rows, list(HEADS), rounds=200, seed=0)

    assert paired["videos"] == 2
    assert paired["queries"]["flight_pose"]["agreement"] == 1.0
    assert paired["queries"]["somersaults"]["agreement"] == 0.5  # b.mp4: served "2", torch "1"
    assert paired["queries"]["somersaults"]["other_accuracy"] == 1.0
