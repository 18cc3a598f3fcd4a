"""The metrics of `vqs evaluate` against hand-computed cases, and its outcome bookkeeping."""

from __future__ import annotations

import json

import pytest

from clients import evaluate as ev


def test_accuracy_and_mean_class_accuracy_weigh_classes_equally():
    truth = ["a", "a", "a", "b"]
    correct = [True, True, True, False]
    assert ev.accuracy(correct) == 0.75
    # a: 3/3, b: 0/1 -> (1 + 0) / 2
    assert ev.mean_class_accuracy(truth, correct) == 0.5
    assert ev.majority_rate(truth) == 0.75
    assert ev.accuracy([]) is None and ev.mean_class_accuracy([], []) is None
    with pytest.raises(ValueError):
        ev.mean_class_accuracy(["a"], [True, False])


def test_ece_by_hand():
    # 4 bins of width 0.25. Bin (0.75, 1]: conf 0.9, 0.8, 1.0 with 2 correct -> |2/3 - 0.9| * 3/5.
    # Bin (0.25, 0.5]: conf 0.5 (upper edge is inside), 0.3, one correct -> |1/2 - 0.4| * 2/5.
    conf = [0.9, 0.8, 1.0, 0.5, 0.3]
    correct = [True, False, True, True, False]
    expected = abs(2 / 3 - 0.9) * 3 / 5 + abs(0.5 - 0.4) * 2 / 5
    assert ev.expected_calibration_error(conf, correct, bins=4) == pytest.approx(expected)


def test_ece_is_zero_when_confidence_matches_accuracy_and_one_when_confidently_wrong():
    assert ev.expected_calibration_error([0.5] * 4, [True, False, True, False], bins=10) == pytest.approx(0.0)
    assert ev.expected_calibration_error([1.0, 1.0], [False, False], bins=10) == pytest.approx(1.0)
    # zero confidence lands in the first bin, not outside
    assert ev.expected_calibration_error([0.0], [False], bins=3) == pytest.approx(0.0)
    assert ev.expected_calibration_error([], [], bins=3) is None
    with pytest.raises(ValueError):
        ev.expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError):
        ev.expected_calibration_error([0.5], [True], bins=0)


def test_quantile_is_numpys_linear_percentile():
    np = pytest.importorskip("numpy")
    values = sorted([0.3, 0.1, 0.7, 0.2, 0.9, 0.4])
    for q in (0.0, 0.025, 0.5, 0.975, 1.0):
        assert ev.quantile(values, q) == pytest.approx(float(np.percentile(values, 100 * q)))


def test_bootstrap_of_a_constant_has_no_width():
    mean, lo, hi = ev.bootstrap_interval([1.0] * 50, rounds=200)
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_interval_matches_a_hand_written_resampler():
    """The interval is the 2.5/97.5 percentiles of resampled mean differences, drawn by the same
    seeded generator."""
    import random

    a = [1, 1, 0, 1, 0, 1, 1, 1, 0, 1]
    b = [0, 1, 0, 0, 0, 1, 0, 1, 0, 0]
    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(5)
    means = sorted(sum(rng.choices(diffs, k=10)) / 10 for _ in range(500))
    mean, lo, hi = ev.bootstrap_interval(diffs, rounds=500, seed=5)
    assert mean == pytest.approx(0.4)
    assert lo == pytest.approx(ev.quantile(means, 0.025))
    assert hi == pytest.approx(ev.quantile(means, 0.975))
    assert 0.0 <= lo < 0.4 < hi <= 0.8  # four discordant pairs, all in a's favour


def test_paired_bootstrap_is_narrower_than_ignoring_the_pairing():
    """Two models that mostly fail on the same videos: pairing cancels the shared difficulty."""
    import random

    rng = random.Random(1)
    hard = [rng.random() < 0.5 for _ in range(300)]
    a = [0.0 if h else 1.0 for h in hard]
    b = list(a)
    for i in range(0, 300, 20):  # b is wrong on 15 more videos
        b[i] = 0.0
    _, plo, phi = ev.bootstrap_interval([x - y for x, y in zip(a, b)], rounds=1000)
    _, alo, ahi = ev.bootstrap_interval(a, rounds=1000, seed=1)
    _, blo, bhi = ev.bootstrap_interval(b, rounds=1000, seed=2)
    unpaired_width = ((ahi - alo) ** 2 + (bhi - blo) ** 2) ** 0.5
    assert phi - plo < unpaired_width / 2
    assert plo > 0


def test_length_bins():
    cuts = [8.0, 14.0]
    assert ev.length_bin_names(cuts) == ["0-8 s", "8-14 s", ">=14 s"]
    assert [ev.length_bin(s, cuts) for s in (2.0, 7.99, 8.0, 13.9, 14.0, 20.0)] == [0, 0, 1, 1, 2, 2]


def _label(file, duration, **labels):
    return {"file": file, "duration_s": duration, **labels}


def _row(file, answers, *, domain=None):
    result = {"video": {"duration_s": 1.0}, "encoder": "s3d",
              "answers": [{"query": q, "attribute": a, "probability": p} for q, (a, p) in answers.items()]}
    if domain is not None:
        result["domain"] = domain
    return {"id": file, "result": result}


def test_summarise_by_hand():
    q = ["twists", "class"]
    labels = [
        _label("a.mp4", 3.0, twists="1", **{"class": "x"}),
        _label("b.mp4", 10.0, twists="1", **{"class": "y"}),
        _label("c.mp4", 16.0, twists="2", **{"class": "x"}),
        _label("d.mp4", 5.0, twists="null", **{"class": "null"}),
    ]
    rows = {
        "a.mp4": _row("a.mp4", {"twists": ("1", 0.9), "class": ("x", 0.6)},
                      domain={"score": -1.0, "threshold": -4.0, "in_domain": True}),
        "b.mp4": _row("b.mp4", {"twists": ("2", 0.7), "class": ("y", 0.8)},
                      domain={"score": -9.0, "threshold": -4.0, "in_domain": False}),
        "c.mp4": {"id": "c.mp4", "error": {"code": "INVALID_ARGUMENT", "message": "bad"}},
        "d.mp4": _row("d.mp4", {"twists": ("null", 0.95), "class": ("null", 0.9)}),
    }
    assert ev.evaluated_queries(labels, rows) == q
    outcomes = [ev.outcome_of(rec, rows.get(rec["file"]), q) for rec in labels]
    m = ev.summarise(outcomes, q, length_cuts=[8, 14], ece_bins=10, rounds=200, seed=0)
    assert m["videos"] == 4 and m["answered"] == 3 and m["routine_videos"] == 3
    assert m["errors"] == {"INVALID_ARGUMENT": 1}
    # Per query over the videos with a routine (a, b, c): d is null everywhere.
    tw, cl = m["queries"]["twists"], m["queries"]["class"]
    assert tw["accuracy"] == pytest.approx(1 / 3)  # a right; b wrong; c failed counts wrong
    assert cl["accuracy"] == pytest.approx(2 / 3)
    # twists classes: "1" 1/2, "2" 0/1 -> 0.25; class: x 1/2, y 1/1 -> 0.75
    assert tw["mean_class_accuracy"] == pytest.approx(0.25)
    assert cl["mean_class_accuracy"] == pytest.approx(0.75)
    assert tw["majority_rate"] == pytest.approx(2 / 3)
    # ECE over the answered routine videos: twists conf 0.9 (right), 0.7 (wrong), one per bin
    assert tw["ece"] == pytest.approx((0.1 + 0.7) / 2)
    assert tw["accuracy_95"][0] <= 1 / 3 <= tw["accuracy_95"][1]
    assert [b["videos"] for b in m["by_length"]] == [1, 1, 1]
    assert m["by_length"][0]["accuracy"] == {"twists": 1.0, "class": 1.0}
    assert m["by_length"][2]["accuracy"] == {"twists": 0.0, "class": 0.0}
    # Every video together: d's nulls count as right.
    assert m["all_videos"]["twists"]["accuracy"] == 0.5
    assert m["all_videos"]["class"]["accuracy"] == 0.75
    assert m["all_videos"]["twists"]["ece"] == pytest.approx((0.1 + 0.7 + 0.05) / 3)
    assert m["no_routine"] == {"videos": 1, "all_null_rate": 1.0}
    assert m["by_kind"] == {}  # these labels have no "kind"
    assert m["in_domain"] == {"known": 2, "out_of_domain_rate": 0.5}


def test_a_split_of_null_videos_only_has_no_per_query_accuracy():
    labels = [_label("r.mp4", 5.0, twists="null")]
    o = ev.outcome_of(labels[0], _row("r.mp4", {"twists": ("1", 0.8)}, domain={
        "score": -9.0, "threshold": -1.0, "in_domain": False}), ["twists"])
    m = ev.summarise([o], ["twists"], length_cuts=[], ece_bins=10, rounds=100, seed=0)
    assert m["routine_videos"] == 0
    assert m["queries"]["twists"]["accuracy"] is None
    assert m["no_routine"] == {"videos": 1, "all_null_rate": 0.0}
    assert m["in_domain"] == {"known": 1, "out_of_domain_rate": 1.0}
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(ev.results_table({"split": {"dir": "x"}, "served": {}, "metrics": m}))
    assert "–" in console.export_text()


def test_in_domain_unknown_when_the_server_reports_none():
    labels = [_label("a.mp4", 3.0, twists="1")]
    rows = {"a.mp4": _row("a.mp4", {"twists": ("1", 0.9)})}
    o = ev.outcome_of(labels[0], rows["a.mp4"], ["twists"])
    assert o.in_domain is None and o.in_domain_score is None
    m = ev.summarise([o], ["twists"], length_cuts=[], ece_bins=10, rounds=100, seed=0)
    assert m["in_domain"] == {"known": 0, "out_of_domain_rate": None}
    assert "not reported" in " ".join(ev.notes({"metrics": m}))


def test_compare_pairs_by_id_and_counts_agreement():
    def video(vid, label, answer):
        return {"id": vid, "labels": {"q": label}, "answers": None if answer is None else {"q": answer}}

    ours = [video("1", "a", "a"), video("2", "b", "b"), video("3", "a", "b"), video("4", "a", None),
            video("6", "null", "a")]
    theirs = [video("2", "b", "a"), video("1", "a", "a"), video("3", "a", "b"), video("4", "a", "a"),
              video("5", "a", "a"), video("6", "null", "null")]  # 5 not ours; 6 has no routine
    c = ev.compare(ours, theirs, ["q"], rounds=200, seed=0)
    s = c["queries"]["q"]
    assert c["videos"] == 4
    assert s["accuracy"] == 0.5 and s["other_accuracy"] == 0.5
    assert s["difference"] == 0.0
    assert s["agreement"] == 0.5  # 1 and 3 answer alike; 2 differs; 4 failed on our side
    assert s["difference_95"][0] < 0 < s["difference_95"][1]


def test_compare_refuses_another_split():
    ours = [{"id": "1", "labels": {"q": "a"}, "answers": {"q": "a"}}]
    with pytest.raises(ValueError, match="different labels"):
        ev.compare(ours, [{"id": "1", "labels": {"q": "b"}, "answers": {"q": "a"}}], ["q"], rounds=100, seed=0)
    with pytest.raises(ValueError, match="no video"):
        ev.compare(ours, [{"id": "9", "labels": {"q": "a"}, "answers": {"q": "a"}}], ["q"], rounds=100, seed=0)


def test_read_labels_refuses_what_is_not_a_split(tmp_path):
    with pytest.raises(ValueError, match="no labels.jsonl"):
        ev.read_labels(tmp_path)
    (tmp_path / "labels.jsonl").write_text('{"file": "a.mp4"}\n{"file": "a.mp4"}\n')
    with pytest.raises(ValueError, match="more than once"):
        ev.read_labels(tmp_path)
    (tmp_path / "labels.jsonl").write_text('{"nofile": 1}\n')
    with pytest.raises(ValueError, match="no \"file\""):
        ev.read_labels(tmp_path)
    (tmp_path / "labels.jsonl").write_text(json.dumps({"file": "a.mp4", "twists": "1"}) + "\n\n")
    records, sha = ev.read_labels(tmp_path)
    assert records == [{"file": "a.mp4", "twists": "1"}] and len(sha) == 64


def test_by_kind_when_the_labels_have_one():
    labels = [_label("a.mp4", 3.0, twists="1", kind="routine"), _label("b.mp4", 3.0, twists="null", kind="idle"),
              _label("c.mp4", 3.0, twists="null", kind="idle")]
    rows = {"a.mp4": _row("a.mp4", {"twists": ("null", 0.6)}), "b.mp4": _row("b.mp4", {"twists": ("null", 0.9)}),
            "c.mp4": _row("c.mp4", {"twists": ("2", 0.5)})}
    outcomes = [ev.outcome_of(rec, rows[rec["file"]], ["twists"]) for rec in labels]
    m = ev.summarise(outcomes, ["twists"], length_cuts=[], ece_bins=10, rounds=100, seed=0)
    assert m["by_kind"] == {
        "idle": {"videos": 2, "accuracy": {"twists": 0.5}, "all_null_rate": 0.5},
        "routine": {"videos": 1, "accuracy": {"twists": 0.0}, "all_null_rate": 1.0},
    }
    assert m["queries"]["twists"]["accuracy"] == 0.0  # over the one routine video
    assert m["no_routine"] == {"videos": 2, "all_null_rate": 0.5}
    assert any("kind idle: 2 videos" in line for line in ev.notes({"metrics": m}))
