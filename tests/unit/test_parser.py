"""Action parser pieces: SPS shapes, the local loss, the pattern-change score and its decoding
(the gateway's reference), arg-max parsing, peaks."""

import numpy as np
import pytest
import torch

from export.models.parser import (ActionParser, BoundaryDetector, ServedParser, SPSUnit, change_scores,
                                  decode_segments, local_loss, parse_responses, pick_peaks, suppress_non_maxima)


def test_sps_unit_returns_features_and_pattern_responses():
    torch.manual_seed(0)
    unit = SPSUnit(dim=16, patterns=5)
    x, alpha = unit(torch.randn(2, 7, 16))
    assert x.shape == (2, 7, 16) and alpha.shape == (2, 7, 5)
    assert torch.allclose(alpha.sum(-1), torch.ones(2, 7), atol=1e-5)


def test_parser_takes_28_px_frames():
    torch.manual_seed(0)
    model = ActionParser(classes=3, dim=32, patterns=4, front=True).eval()
    frames = torch.randint(0, 256, (1, 6, 28, 28, 3), dtype=torch.uint8)
    responses, logits = model(frames)
    assert responses.shape == (1, 6, 4) and logits.shape == (1, 3)
    responses, scores = ServedParser(model)(frames)
    assert responses.shape == (1, 6, 4) and scores.shape == (1, 6)


def test_the_front_end_starts_as_the_identity_on_stage_1_features():
    torch.manual_seed(0)
    with_front, without = ActionParser(classes=3, dim=32, front=True), ActionParser(classes=3, dim=32)
    without.load_state_dict(with_front.state_dict(), strict=False)
    f = torch.randn(1, 9, 32)
    # the front end adds nothing at first, then normalises: the SPS units see layer-normed stage-1 features
    torch.testing.assert_close(with_front.front(f), torch.nn.functional.layer_norm(f, (32,)), atol=1e-5, rtol=0)


def _one_hot_runs(lengths, patterns):
    labels = np.repeat(np.arange(len(lengths)) % patterns, lengths)
    return torch.nn.functional.one_hot(torch.from_numpy(labels), patterns).float()[None]


def test_change_score_is_one_where_the_pattern_switches_and_zero_inside():
    responses = _one_hot_runs([5, 4, 3], 3)
    scores = change_scores(responses, 2)[0].numpy()
    assert scores[5] == pytest.approx(1) and scores[9] == pytest.approx(1)
    assert scores[4] == pytest.approx(0.5) and scores[6] == pytest.approx(0.5)  # half the window switched
    assert scores[[0, 1, 2, 7, 11]].tolist() == pytest.approx([0, 0, 0, 0, 0])


def test_non_maximum_suppression_keeps_one_peak_per_radius():
    scores = torch.tensor([[0.0, 0.2, 0.9, 0.3, 0.0, 0.5, 0.0, 0.0, 0.6, 0.1]])
    assert suppress_non_maxima(scores, 3)[0].tolist() == pytest.approx([0, 0, 0.9, 0, 0, 0, 0, 0, 0.6, 0])
    assert suppress_non_maxima(scores, 1)[0].tolist() == pytest.approx([0, 0, 0.9, 0, 0, 0.5, 0, 0, 0.6, 0])


def test_served_boundary_scores_of_a_window_equal_the_whole_videos():
    """The gateway runs long videos in windows with `context_frames` either side."""
    torch.manual_seed(0)
    model = ServedParser(ActionParser(classes=3, dim=32, patterns=4, front=True, min_segment_frames=4)).eval()
    c = model.parser.context_frames
    frames = torch.randint(0, 256, (1, 70, 28, 28, 3), dtype=torch.uint8)
    with torch.no_grad():
        whole = model(frames)
        window = model(frames[:, 30 - c:50 + c])
    for w, v in zip(window, whole):
        torch.testing.assert_close(w[:, c:c + 20], v[:, 30:50], atol=1e-5, rtol=0)


def test_decode_segments_thresholds_limits_and_labels_the_runs():
    responses = _one_hot_runs([5, 4, 3], 3)[0].numpy() * 0.8 + 0.2 / 3
    scores = np.zeros(12)
    scores[[5, 9, 2]] = [0.9, 0.7, 0.4]
    segments, boundaries = decode_segments(scores, responses, threshold=0.5)
    assert boundaries.tolist() == [5, 9]
    assert [(s.start, s.end, s.pattern) for s in segments] == [(0, 5, 0), (5, 9, 1), (9, 12, 2)]
    assert segments[0].confidence == pytest.approx(0.8 + 0.2 / 3)
    assert decode_segments(scores, responses, threshold=0.3)[1].tolist() == [2, 5, 9]
    assert decode_segments(scores, responses, threshold=0.3, max_boundaries=2)[1].tolist() == [5, 9]
    assert decode_segments(scores, responses, threshold=0.95)[1].tolist() == []
    with pytest.raises(ValueError):
        decode_segments(scores[:5], responses, threshold=0.5)


def test_local_loss_prefers_one_pattern_per_sub_action():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    consistent = torch.nn.functional.one_hot(segments, 4).float()
    mixed = torch.full((1, 8, 4), 0.25)
    mixed[0, ::2] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # alternates inside every sub-action
    assert local_loss(consistent, segments) < local_loss(mixed, segments)
    # with one-hot responses: L_sim ~ 0, L_dissim = sqrt(2), so the loss is margin / sqrt(2)
    assert float(local_loss(consistent, segments, margin=0.1)) == pytest.approx(0.1 / np.sqrt(2), abs=1e-3)


def test_local_loss_gradient_is_finite_and_single_segment_windows_are_skipped():
    responses = torch.softmax(torch.randn(2, 6, 3), -1).requires_grad_()
    segments = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2]])
    loss = local_loss(responses, segments)
    loss.backward()
    assert torch.isfinite(responses.grad).all()
    assert responses.grad[0].abs().sum() == 0  # the one-segment window contributes nothing


def test_parse_responses_merges_flicker_and_reports_confidence():
    patterns = [0, 0, 0, 0, 1, 0, 0, 2, 2, 2, 2]
    responses = np.full((len(patterns), 3), 0.1)
    responses[np.arange(len(patterns)), patterns] = 0.8
    segments = parse_responses(responses, min_length=2)
    assert [(s.start, s.end, s.pattern) for s in segments] == [(0, 7, 0), (7, 11, 2)]
    assert segments[1].confidence == pytest.approx(0.8)
    assert segments[0].confidence == pytest.approx((6 * 0.8 + 0.1) / 7)


def test_boundary_detector_scores_every_frame():
    out = BoundaryDetector(dim=8)(torch.randn(2, 9, 8))
    assert out.shape == (2, 9)


def test_pick_peaks_one_per_run_and_spaced():
    scores = np.array([0, 0.6, 0.9, 0.7, 0, 0, 0.8, 0, 0.95, 0])
    assert pick_peaks(scores, 0.5, 1).tolist() == [2, 6, 8]
    assert pick_peaks(scores, 0.5, 3).tolist() == [2, 8]  # 6 is within 3 of the stronger 8
    assert pick_peaks(scores, 0.99, 1).tolist() == []


def test_smoothing_removes_flicker_before_the_arg_max():
    patterns = [0] * 6 + [1] + [0] * 6 + [2] * 8
    responses = np.full((len(patterns), 3), 0.2)
    responses[np.arange(len(patterns)), patterns] = 0.6
    assert len(parse_responses(responses, min_length=1)) == 4
    segments = parse_responses(responses, min_length=1, smooth=3)
    assert [(s.start, s.pattern) for s in segments] == [(0, 0), (13, 2)]


def test_local_loss_on_near_pairs_sees_only_the_frames_around_a_boundary():
    segments = torch.tensor([[0] * 6 + [1] * 6])
    sharp = torch.nn.functional.one_hot(segments, 2).float()
    blurred = sharp.clone()
    blurred[0, 4:8] = 0.5  # the change smeared over four frames; far pairs are as before
    # all pairs: the smear moves few of the 36 cross pairs; near pairs: most of them
    gap_all = float(local_loss(blurred, segments) - local_loss(sharp, segments))
    gap_near = float(local_loss(blurred, segments, radius=2) - local_loss(sharp, segments, radius=2))
    assert gap_near > 2 * gap_all > 0


def test_boundary_loss_rewards_a_switch_exactly_at_the_start_and_stillness_elsewhere():
    from export.models.parser import boundary_loss

    starts = torch.tensor([[0, 0, 0, 1, 0, 0, 0, 0]])
    sharp = change_scores(_one_hot_runs([3, 5], 2), 1)
    smeared = change_scores(_one_hot_runs([3, 5], 2) * 0.5 + _one_hot_runs([2, 6], 2) * 0.5, 1)
    late = change_scores(_one_hot_runs([5, 3], 2), 1)
    assert boundary_loss(sharp, starts) < boundary_loss(smeared, starts) < boundary_loss(late, starts)
    assert torch.isfinite(boundary_loss(sharp, torch.zeros(1, 8))).all()  # a window without a start
