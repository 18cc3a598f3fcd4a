"""Parsing and embedding metrics against hand-computed cases."""

import numpy as np
import pytest

from export import segments_eval as se


def test_one_to_one_matching_counts_each_truth_once():
    # two predictions near truth 10: only one may match; 30 is 3 away from truth 27
    c = se.match_boundaries([9, 11, 30], [10, 27], tolerance=2)
    assert (c.matched, c.predicted, c.truth) == (1, 3, 2)
    c = se.match_boundaries([9, 11, 30], [10, 27], tolerance=3)
    assert c.matched == 2
    assert c.precision == pytest.approx(2 / 3) and c.recall == 1.0
    assert c.f1 == pytest.approx(0.8)


def test_matching_is_maximal_not_greedy_nearest():
    # all three candidate pairs (3-2, 3-4, 5-4) are 1 apart; pairing 3 with 4 would strand both
    # 2 and 5, the maximum matching is 3-2 and 5-4
    assert se.match_boundaries([5, 3], [4, 2], tolerance=1).matched == 2


def test_boundary_scores_sum_over_videos_and_scale_tolerance():
    videos = [([10], [12], 1.0), ([10], [12], 2.0)]  # second video: tolerance doubled
    counts = se.boundary_scores(videos, (1, 2))
    assert counts[1].matched == 1 and counts[2].matched == 2
    avg = se.average(counts)
    assert avg["f1"] == pytest.approx((0.5 + 1.0) / 2)


def test_no_predictions_scores_zero_without_dividing_by_zero():
    c = se.match_boundaries([], [3, 8], 2)
    assert (c.precision, c.recall, c.f1) == (0.0, 0.0, 0.0)


def test_segments_and_boundaries_of_labels():
    labels = [0, 0, 1, 1, 1, 0, 2]
    assert se.boundaries_of(labels).tolist() == [2, 5, 6]
    assert se.segments_of(labels) == [(0, 0, 2), (1, 2, 5), (0, 5, 6), (2, 6, 7)]
    assert se.labels_from_boundaries([2, 5], 7).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert se.labels_from_boundaries([1, 2, 3], 5, order=[0, 1]).tolist() == [0, 1, 1, 1, 1]


def test_short_runs_merge_into_neighbours():
    # a one-frame flicker inside a run disappears; a short run between two different labels joins
    # the longer side
    assert se.drop_short_segments([0, 0, 0, 1, 0, 0], 2).tolist() == [0] * 6
    assert se.drop_short_segments([0, 0, 0, 2, 1, 1, 1, 1], 2).tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert se.drop_short_segments([0, 1, 2], 1).tolist() == [0, 1, 2]


def test_frame_accuracy_and_balanced_accuracy():
    truth = [0, 0, 0, 0, 0, 0, 1, 1]
    pred = [0, 0, 0, 0, 0, 0, 0, 1]
    assert se.frame_accuracy(pred, truth) == pytest.approx(7 / 8)
    assert se.balanced_accuracy(pred, truth) == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError):
        se.frame_accuracy([0], [0, 1])


def test_segmental_f1_uses_iou_per_label():
    truth = [0] * 10 + [1] * 10
    pred = [0] * 14 + [1] * 6  # IoU 10/14 for label 0, 6/10 for label 1
    assert se.segmental_counts(pred, truth, 0.5).matched == 2
    assert se.segmental_counts(pred, truth, 0.65).matched == 1
    # a second segment of label 1 cannot match the already matched truth segment
    pred = [0] * 10 + [1] * 5 + [0] + [1] * 4
    c = se.segmental_counts(pred, truth, 0.1)
    assert (c.matched, c.predicted, c.truth) == (2, 4, 2)


def test_kendall_tau_b():
    assert se.kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert se.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # pairs: (1,2)+ (1,3)+ (2,3)- -> (2-1)/3
    assert se.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # a tie in y: pairs (1,2) tie, (1,3)+, (2,3)+ -> 2 / sqrt(3*2)
    assert se.kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / np.sqrt(6))


def test_alignment_tau_of_a_sequence_with_itself_is_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 8))
    assert se.alignment_tau(a, a) == pytest.approx(1.0)
    assert se.alignment_tau(a, a[::-1]) == pytest.approx(-1.0)


def test_retrieval_ap_divides_by_k():
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    gallery_labels = [0, 1, 1, 0]
    # the query is closest to rows 0, 1, then 3, 2: relevance 1, 0, 1 at k=3
    ap = se.retrieval_ap([[1.0, 0.0]], [0], gallery, gallery_labels, k=3)
    assert ap == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert se.retrieval_ap([[1.0, 0.0]], [0], gallery, gallery_labels, k=1) == 1.0
    with pytest.raises(ValueError):
        se.retrieval_ap([[1.0, 0.0]], [0], gallery, gallery_labels, k=5)


def test_r_squared():
    assert se.r_squared([1, 2, 3], [1, 2, 3]) == 1.0
    assert se.r_squared([2, 2, 2], [1, 2, 3]) == 0.0
