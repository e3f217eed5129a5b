"""Figures of merit computed by hand on tiny cases: AUC, ECE, ranks, top-k, McNemar."""

from __future__ import annotations

import numpy as np
import pytest

from hemaflow.scoring import one_vs_rest_auc, reliability, top_k_accuracy, true_class_ranks


def test_auc_per_class_and_macro():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    macro, per_class = one_vs_rest_auc(y, probs)
    # class 1 scores: positives 0.65, 0.8 vs negatives 0.1, 0.6 -> all 4 pairs ordered
    assert per_class == [pytest.approx(1.0), pytest.approx(1.0)] and macro == pytest.approx(1.0)


def test_auc_skips_a_class_absent_from_the_split():
    y = np.array([0, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    macro, per_class = one_vs_rest_auc(y, probs)
    assert per_class[2] is None and per_class[1] == pytest.approx(1.0)
    assert macro == pytest.approx((per_class[0] + per_class[1]) / 2)


def test_ece_by_hand():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.3, 0.7]])
    ece, bins = reliability(y, probs, n_bins=10)
    # bin 0.9-1.0: 2 images, conf 0.95, acc 1 -> gap 0.05; bin 0.5-0.6: conf 0.6 acc 0; bin 0.6-0.7: conf 0.7 acc 1
    assert ece == pytest.approx(0.5 * 0.05 + 0.25 * 0.6 + 0.25 * 0.3)
    assert sum(b["images"] for b in bins) == 4 and len(bins) == 10


def test_perfect_confident_model_has_zero_ece():
    y = np.array([0, 1, 2])
    assert reliability(y, np.eye(3)[y])[0] == pytest.approx(0.0)


def test_ranks_and_top_k():
    y = np.array([0, 1, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.3, 0.2]])
    assert true_class_ranks(y, probs).tolist() == [1, 2, 3]
    assert top_k_accuracy(y, probs, 1) == pytest.approx(1 / 3) and top_k_accuracy(y, probs, 2) == pytest.approx(2 / 3)


def test_accuracy_interval_is_wilson_and_reported_with_the_accuracy():
    """10 errors in 1,025 images: 0.9902, whose 95 % interval (0.982-0.995) straddles 0.99."""
    from hemaflow.scoring import accuracy_interval, score_predictions

    low, high = accuracy_interval(1015, 1025)
    assert low == pytest.approx(0.98213, abs=1e-4) and high == pytest.approx(0.99469, abs=1e-4)
    assert accuracy_interval(10, 10)[1] == 1.0 and accuracy_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-3)
    assert accuracy_interval(0, 0) == (0.0, 1.0)
    y = np.array([0] * 90 + [1] * 10)
    overall, _, _ = score_predictions(y, np.where(np.arange(100) < 5, 1, y), ("a", "b"))
    assert overall["accuracy"] == 0.95
    assert overall["accuracy_ci95_low"] < 0.95 < overall["accuracy_ci95_high"]
    assert (overall["accuracy_ci95_low"], overall["accuracy_ci95_high"]) == accuracy_interval(95, 100)
