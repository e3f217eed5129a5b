"""The promotion gate's arithmetic: recall floor, margin, exact McNemar, test size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hemaflow.gate import decide, mcnemar, score, fingerprint_test_set

CLASSES = ("a", "b", "c", "d", "e")
T = dict(min_balanced_accuracy=0.8, min_class_recall=0.5, min_improvement=0.0, mcnemar_alpha=0.05, min_test_size=25)


def labels(per_class: int = 10) -> np.ndarray:
    return np.repeat(np.arange(len(CLASSES)), per_class)


def test_one_dead_class_fails_the_floor_although_balanced_accuracy_clears_0_8():
    y = labels()
    pred = y.copy()
    pred[y == 4] = 0                      # class e never found, the others perfect
    s = score(y, pred, CLASSES)
    assert s.balanced_accuracy == pytest.approx(0.8) and s.recall["e"] == 0.0
    d = decide(s, None, **T)
    assert not d.passed
    assert d.failed == ["min_class_recall: below the floor 0.500: e 0.000 (n=10)"]
    assert any(r.startswith("PASS first_model_balanced_accuracy") for r in d.reasons)


def test_first_model_needs_the_absolute_threshold_and_the_test_size():
    y = labels(4)                          # 20 images < 25
    d = decide(score(y, y, CLASSES), None, **T)
    assert not d.passed and d.failed == ["min_test_size: 20 test images < 25"]
    y = labels(10)
    pred = np.where(np.arange(len(y)) % 10 < 7, y, (y + 1) % 5)   # 0.7 everywhere
    d = decide(score(y, pred, CLASSES), None, **T)
    assert not d.passed and "balanced accuracy 0.7000 < min_balanced_accuracy 0.8000" in d.failed[0]


def test_clear_improvement_passes_and_noise_does_not():
    y = labels(10)
    champ = np.where(np.arange(len(y)) % 10 < 7, y, (y + 1) % 5)     # 70 % right
    better = np.where(np.arange(len(y)) % 10 < 9, y, (y + 1) % 5)    # 90 %: 10 more right, none worse
    d = decide(score(y, better, CLASSES), score(y, champ, CLASSES), **T)
    assert d.passed, d.reasons
    assert d.mcnemar == {"b": 0, "c": 10, "p_value": pytest.approx(2 / 2 ** 10), "method": "exact"}

    slightly = champ.copy()
    slightly[[7, 17]] = y[[7, 17]]        # two more right: improves, but could be noise
    d = decide(score(y, slightly, CLASSES), score(y, champ, CLASSES), **T)
    assert not d.passed
    assert [f.split(":")[0] for f in d.failed] == ["mcnemar"]
    assert "p = 0.5 >= alpha 0.05 (the difference could be noise)" in d.failed[0]


def test_worse_or_equal_challenger_fails_the_margin():
    y = labels(10)
    champ = np.where(np.arange(len(y)) % 10 < 9, y, (y + 1) % 5)
    worse = np.where(np.arange(len(y)) % 10 < 6, y, (y + 1) % 5)
    d = decide(score(y, worse, CLASSES), score(y, champ, CLASSES), **T)
    assert not d.passed and any(f.startswith("min_improvement: balanced accuracy 0.9000 -> 0.6000")
                                for f in d.failed)
    d = decide(score(y, champ, CLASSES), score(y, champ, CLASSES), **T)
    assert not d.passed and "delta +0.0000" in d.failed[0]


def test_margin_is_applied():
    y = labels(20)
    champ = np.where(np.arange(len(y)) % 20 < 10, y, (y + 1) % 5)    # 0.50
    chal = np.where(np.arange(len(y)) % 20 < 19, y, (y + 1) % 5)     # 0.95
    assert decide(score(y, chal, CLASSES), score(y, champ, CLASSES), **{**T, "min_improvement": 0.5}).failed[0] \
        .startswith("min_improvement")
    assert decide(score(y, chal, CLASSES), score(y, champ, CLASSES), **{**T, "min_improvement": 0.4}).passed


def test_mcnemar_exact_and_large_sample():
    a = np.array([True] * 5 + [False] * 1)
    b = np.array([False] * 5 + [True] * 1)
    # b=5 (champion right only), c=1: exact two-sided p = 2 * P(X<=1 | n=6) = 2 * 7/64
    assert mcnemar(a, b) == {"b": 5, "c": 1, "p_value": pytest.approx(14 / 64), "method": "exact"}
    big_a = np.array([True] * 40 + [False] * 20)
    big_b = np.array([False] * 40 + [True] * 20)
    res = mcnemar(big_a, big_b)
    assert res["method"] == "chi2_cc" and res["p_value"] == pytest.approx(math.erfc(math.sqrt((19 ** 2 / 60) / 2)))
    assert mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="same images"):
        mcnemar(a, a[:3])


def test_mcnemar_can_be_switched_off_and_fingerprint_is_order_free():
    y = labels(10)
    champ = np.where(np.arange(len(y)) % 10 < 7, y, (y + 1) % 5)
    slightly = champ.copy()
    slightly[[7, 17]] = y[[7, 17]]
    assert decide(score(y, slightly, CLASSES), score(y, champ, CLASSES), **{**T, "mcnemar_alpha": None}).passed
    assert fingerprint_test_set(["x", "y"], ["a", "b"]) == fingerprint_test_set(["y", "x"], ["b", "a"])
    assert fingerprint_test_set(["x", "y"], ["a", "b"]) != fingerprint_test_set(["x", "y"], ["b", "a"])
