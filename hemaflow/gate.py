"""Promotion gate: a challenger against the champion, on the same images, in the same run.

Pure numbers in, a decision with every reason out (no I/O): tasks/promote.py scores both
models on the same test split and calls `decide`.

Checks (thresholds from params `promote`):
- min_test_size: the test set has at least this many images (a tiny set proves nothing);
- min_class_recall: every class's recall on the test set is at least this floor (a model
  that never finds basophils is not shipped however good its average is);
- first model (no champion): balanced accuracy >= min_balanced_accuracy (absolute);
- with a champion: balanced accuracy improves by > 0 and >= min_improvement, and the
  exact McNemar test on the paired per-image correctness says the difference is not noise
  (two-sided p < mcnemar_alpha, the challenger right more often where they disagree).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Scores:
    """One model's figures on one test set."""
    n: int
    accuracy: float
    balanced_accuracy: float
    recall: dict[str, float]           # class -> recall (nan: no test image of that class)
    support: dict[str, int]
    correct: np.ndarray = field(repr=False)  # per image: prediction == truth

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": round(self.accuracy, 6), "balanced_accuracy": round(self.balanced_accuracy, 6),
                "recall": {k: (None if math.isnan(v) else round(v, 6)) for k, v in self.recall.items()},
                "support": dict(self.support)}


def score(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> Scores:
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    correct = y_true == y_pred
    recall, support = {}, {}
    for i, c in enumerate(classes):
        mask = y_true == i
        support[c] = int(mask.sum())
        recall[c] = float(correct[mask].mean()) if mask.any() else float("nan")
    present = [r for r in recall.values() if not math.isnan(r)]
    return Scores(n=int(len(y_true)), accuracy=float(correct.mean()) if len(y_true) else 0.0,
                  balanced_accuracy=float(np.mean(present)) if present else 0.0,
                  recall=recall, support=support, correct=correct)


def fingerprint_test_set(paths: Sequence[str], labels: Sequence[str]) -> str:
    """sha256 of the (path, label) list: which frozen set both models were scored on."""
    digest = hashlib.sha256()
    for p, lab in sorted(zip(paths, labels)):
        digest.update(f"{p}\t{lab}\n".encode())
    return digest.hexdigest()


def mcnemar(champion_correct: np.ndarray, challenger_correct: np.ndarray) -> dict[str, Any]:
    """Paired test on the images where exactly one model is right.

    b: champion right, challenger wrong; c: challenger right, champion wrong. Exact binomial
    (two-sided) up to 50 discordant images, chi-square with continuity correction beyond."""
    a, b_ = np.asarray(champion_correct, bool), np.asarray(challenger_correct, bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired test needs the same images: {a.shape} vs {b_.shape}")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_value": 1.0, "method": "exact"}
    if n <= 50:
        k = min(b, c)
        p = min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n)
        method = "exact"
    else:
        stat = (abs(b - c) - 1) ** 2 / n
        p = math.erfc(math.sqrt(stat / 2))  # chi-square with one degree of freedom
        method = "chi2_cc"
    return {"b": b, "c": c, "p_value": float(p), "method": method}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    passed: bool
    checks: list[Check]
    challenger: dict[str, Any]
    champion: dict[str, Any] | None = None
    mcnemar: dict[str, Any] | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        return [f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.reason}" for c in self.checks]

    @property
    def failed(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks], "challenger": self.challenger,
                "champion": self.champion, "mcnemar": self.mcnemar, "thresholds": self.thresholds}


def decide(challenger: Scores, champion: Scores | None, *, min_balanced_accuracy: float, min_class_recall: float,
           min_improvement: float, mcnemar_alpha: float | None, min_test_size: int) -> Decision:
    thresholds = {"min_balanced_accuracy": min_balanced_accuracy, "min_class_recall": min_class_recall,
                  "min_improvement": min_improvement, "mcnemar_alpha": mcnemar_alpha, "min_test_size": min_test_size}
    checks = [Check("min_test_size", challenger.n >= min_test_size,
                    f"{challenger.n} test images {'>=' if challenger.n >= min_test_size else '<'} {min_test_size}")]
    low = {c: r for c, r in challenger.recall.items() if math.isnan(r) or r < min_class_recall}
    checks.append(Check(
        "min_class_recall", not low,
        f"every class's recall >= {min_class_recall:.3f} (lowest: "
        f"{min(challenger.recall, key=lambda c: -1 if math.isnan(challenger.recall[c]) else challenger.recall[c])} "
        f"{min((r for r in challenger.recall.values() if not math.isnan(r)), default=float('nan')):.3f})"
        if not low else
        "below the floor " + f"{min_class_recall:.3f}: " + ", ".join(
            f"{c} {'no test images' if math.isnan(r) else f'{r:.3f}'} (n={challenger.support[c]})"
            for c, r in low.items())))
    test = None
    if champion is None:
        ok = challenger.balanced_accuracy >= min_balanced_accuracy
        checks.append(Check("first_model_balanced_accuracy", ok,
                            f"first model: balanced accuracy {challenger.balanced_accuracy:.4f} "
                            f"{'>=' if ok else '<'} min_balanced_accuracy {min_balanced_accuracy:.4f}"))
    else:
        if champion.n != challenger.n:
            raise ValueError("champion and challenger must be scored on the same test images")
        delta = challenger.balanced_accuracy - champion.balanced_accuracy
        ok = delta > 0 and delta >= min_improvement
        checks.append(Check("min_improvement", ok,
                            f"balanced accuracy {champion.balanced_accuracy:.4f} -> {challenger.balanced_accuracy:.4f} "
                            f"(delta {delta:+.4f}; needs > 0 and >= {min_improvement:.4f})"))
        test = mcnemar(champion.correct, challenger.correct)
        if mcnemar_alpha is not None:
            below = test["p_value"] < mcnemar_alpha
            sig = below and test["c"] > test["b"]
            verdict = ("" if sig else " (the challenger is significantly worse)" if below
                       else " (the difference could be noise)")
            checks.append(Check("mcnemar", sig,
                                f"{test['method']} McNemar on {challenger.n} paired images: challenger right where "
                                f"champion wrong {test['c']}, the reverse {test['b']}, p = {test['p_value']:.4g} "
                                f"{'<' if below else '>='} alpha {mcnemar_alpha}{verdict}"))
    return Decision(passed=all(c.passed for c in checks), checks=checks, challenger=challenger.as_dict(),
                    champion=champion.as_dict() if champion else None, mcnemar=test, thresholds=thresholds)
