"""The test-split evaluation's paired intervals (pure numpy; the Triton run itself is export-time)."""

import numpy as np

from export.evaluate_adaptive import paired_intervals
from export.train_adaptive import HEADS

QUERIES = list(HEADS)


def test_paired_intervals_pair_the_same_videos_and_cover_the_difference():
    rng = np.random.default_rng(0)
    plain_videos = np.arange(0, 200)
    plain = rng.random((200, len(HEADS))) < 0.6
    answers = plain.copy()
    answers[:20, 0] = ~plain[:20, 0]  # query 0 differs on 20 of 200 videos, the others not at all
    expected = 100 * (answers[:, 0].mean() - plain[:, 0].mean())
    got = paired_intervals((plain_videos, answers), (plain_videos, plain))
    lo, hi = got[QUERIES[0]]
    assert lo <= expected <= hi and hi - lo > 0
    assert got[QUERIES[1]] == [0.0, 0.0]  # identical answers: no uncertainty in the difference
    # the configuration answered every other video (a budget curve): only those are paired
    curve = plain_videos[::2]
    sub = paired_intervals((curve, answers[::2]), (plain_videos, plain), among=curve)
    assert sub[QUERIES[1]] == [0.0, 0.0]
    shifted = paired_intervals((curve, plain[1::2]), (plain_videos, plain))  # the wrong rows: not identical
    assert shifted[QUERIES[1]] != [0.0, 0.0]
