"""The golden comparison itself: what its tolerance lets through and what it catches."""

from __future__ import annotations

import copy

from tests import golden

CASE = {
    "video": {"clips": 3, "frames": 24, "width": 112, "height": 112, "fps": 15.0, "duration_s": 1.6},
    "encoder": "s3d",
    "answers": {
        "twists": {"attribute": "1", "probability": 0.9, "distribution": {"0": 0.1, "1": 0.9}},
        "pose": {"attribute": "tuck", "probability": 0.51,
                 "distribution": {"pike": 0.49, "tuck": 0.51}},
    },
    "attention": {"twists": [0.2, 0.5, 0.3], "pose": [0.3, 0.3, 0.4]},
}


def served(**changes) -> dict:
    got = copy.deepcopy(CASE)
    for path, value in changes.items():
        *keys, last = path.split("__")
        node = got
        for key in keys:
            node = node[key]
        node[last] = value
    return got


def test_identical_and_within_tolerance_pass():
    assert golden.compare(CASE, copy.deepcopy(CASE)) == []
    got = served(answers__twists__distribution={"0": 0.115, "1": 0.885},
                 attention__twists=[0.21, 0.49, 0.3])
    assert golden.compare(CASE, got) == []


def test_a_moved_probability_or_weight_fails():
    got = served(answers__twists__distribution={"0": 0.13, "1": 0.87})
    assert any("twists: probabilities moved" in p for p in golden.compare(CASE, got))
    got = served(attention__pose=[0.3, 0.25, 0.45])
    assert any("attention pose" in p for p in golden.compare(CASE, got))


def test_a_near_tie_may_flip_but_a_clear_answer_may_not():
    flipped = served(answers__pose={"attribute": "pike", "probability": 0.5,
                                    "distribution": {"pike": 0.5, "tuck": 0.5}})
    assert golden.compare(CASE, flipped) == []
    wrong = served(answers__twists={"attribute": "0", "probability": 0.9,
                                    "distribution": {"0": 0.1, "1": 0.9}})
    assert any("answered '0'" in p for p in golden.compare(CASE, wrong))


def test_different_clips_or_queries_fail():
    assert any("clips" in p for p in golden.compare(CASE, served(video__clips=4)))
    fewer = copy.deepcopy(CASE)
    del fewer["answers"]["pose"]
    assert any("queries" in p for p in golden.compare(CASE, fewer))
