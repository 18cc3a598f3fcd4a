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


def test_the_adaptive_screen_scores_each_video_by_its_own_clips():
    import math
    from types import SimpleNamespace

    import torch

    from export.adaptive_screen import answers

    sizes = [len(a) for a in HEADS.values()]

    def decoder(feats, mask):  # every head answers index 1 if the video's clips sum positive, else 0
        sign = 1.0 if float(feats.sum()) > 0 else -1.0
        return [torch.tensor([[0.0, sign] + [-9.0] * (n - 2)]) for n in sizes] + [torch.zeros(1)]

    ds = SimpleNamespace(records=[{}, {}], num_clips=np.array([2, 3]),
                         targets={q: np.array([1, 1]) for q in HEADS})
    features = np.array([[1.0], [1.0], [-1.0], [-1.0], [5.0]], np.float32)  # video 0: +2; video 1: +3
    hits, nll = answers(decoder, features, ds)
    assert hits.shape == nll.shape == (2, len(HEADS)) and hits.all()
    tail = sum(math.exp(-9.0) for _ in range(max(sizes) - 2))
    assert 0 < nll[0, 0] < math.log(1 + math.exp(-1.0) + tail) + 1e-6  # the truth is the likelier answer
    features[4] = 0.0  # video 1 now sums to -2: answers 0, wrong, and its truth is unlikely
    hits, nll = answers(decoder, features, ds)
    assert hits[0].all() and not hits[1].any() and (nll[1] > nll[0]).all()


def test_the_plots_draw_whichever_adaptive_encoders_were_evaluated(tmp_path):
    """--encoders vit vit_ats (no s3d_sgs) or s3d s3d_sgs (no ViT) each get their panels."""
    from export.evaluate_adaptive import _plots

    rng = np.random.default_rng(0)
    accuracy = {q: 0.9 for q in HEADS}
    phases = rng.integers(0, 5, 40)
    runs = {
        "vit": ({"vit": {"budget": None}, "vit_ats": {"budget": 0.5}},
                {"vit": {"budget": None, "accuracy": accuracy, "ms_per_clip": 3.0},
                 "vit_ats": {"budget": 0.5, "accuracy": accuracy, "ms_per_clip": 2.0}},
                {"vit_ats": (rng.integers(8, 197, (40, 4)), phases)}),
        "s3d": ({"s3d": {"budget": None}, "s3d_sgs": {"budget": 1.0}},
                {"s3d": {"budget": None, "accuracy": accuracy, "ms_per_clip": 3.0},
                 "s3d_sgs": {"budget": 1.0, "accuracy": accuracy, "ms_per_clip": 2.0}},
                {"s3d_sgs": (rng.integers(1, 9, (40, 1)), phases)}),
    }
    for name, (summary, curve, kept) in runs.items():
        pngs = _plots(summary, curve, kept, tmp_path / name)
        assert [p.rsplit("/", 1)[-1] for p in pngs] == ["adaptive_budget_curve.png", "adaptive_kept_histograms.png"]
        assert all((tmp_path / name / p.rsplit("/", 1)[-1]).stat().st_size > 0 for p in pngs)
