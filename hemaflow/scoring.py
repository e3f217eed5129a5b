"""Figures of merit for a classifier's probabilities: the numbers evaluate reports.

Pure numpy/scikit-learn on (y_true, probs) so evaluate, the benchmarks and the promotion
gate compute every figure the same way. Balanced accuracy and macro F1 sit next to
accuracy because white-cell classes are very unequal in real smears; calibration (ECE)
says whether a 0.9 confidence means 90 % right, which a lab reading the top-3 needs.
"""

from __future__ import annotations

import numpy as np


def score_predictions(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> tuple[dict, dict, np.ndarray]:
    """Overall metrics, per-class metrics and the confusion matrix (rows = true, columns = predicted)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = s > 0  # macro F1 over classes that occur in this split, like balanced accuracy
    n_right = int((np.asarray(y_true) == np.asarray(y_pred)).sum())
    low, high = accuracy_interval(n_right, len(y_true))
    overall = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci95_low": low,
        "accuracy_ci95_high": high,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f[present])) if present.any() else 0.0,
    }
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                 for i, c in enumerate(classes)}
    return overall, per_class, confusion_matrix(y_true, y_pred, labels=labels)


def accuracy_interval(n_right: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on n images (scipy): where the same model
    could land on another sample of that size. 10 errors in 1,025 (0.990) is 0.982-0.995, so
    one run above or below a 0.99 target on a folder that size says little on its own."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(n_right, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log probability of the true class (clipped: one certain mistake is not infinite)."""
    p_true = probs[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.mean(np.log(np.clip(p_true, 1e-12, 1))))


def one_vs_rest_auc(y_true: np.ndarray, probs: np.ndarray) -> tuple[float | None, list[float | None]]:
    """Macro one-vs-rest ROC AUC over the classes that have both positives and negatives
    here (a class absent from the split has no AUC), and the per-class values."""
    from sklearn.metrics import roc_auc_score

    per_class: list[float | None] = []
    for k in range(probs.shape[1]):
        positive = y_true == k
        if positive.all() or not positive.any():
            per_class.append(None)
        else:
            per_class.append(float(roc_auc_score(positive, probs[:, k])))
    defined = [a for a in per_class if a is not None]
    return (float(np.mean(defined)) if defined else None), per_class


def reliability(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-1 confidence over equal-width bins, and the bins
    (lower/upper edge, images, mean confidence, accuracy) for the reliability diagram."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece, n = [], 0.0, max(1, len(conf))
    for b in range(n_bins):
        inside = which == b
        count = int(inside.sum())
        row = {"lower": float(edges[b]), "upper": float(edges[b + 1]), "images": count,
               "confidence": float(conf[inside].mean()) if count else None,
               "accuracy": float(correct[inside].mean()) if count else None}
        if count:
            ece += count / n * abs(row["accuracy"] - row["confidence"])
        bins.append(row)
    return float(ece), bins


def true_class_ranks(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """1-based rank of the true class among the sorted probabilities (1 = predicted)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    return np.argmax(order == np.asarray(y_true)[:, None], axis=1) + 1


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    return float(np.mean(true_class_ranks(y_true, probs) <= k)) if len(y_true) else 0.0

