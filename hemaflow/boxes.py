"""Axis-aligned box overlap and one-to-one matching, to score a detector against annotations.

Boxes are (xmin, ymin, xmax, ymax) in pixel-edge coordinates: area = (xmax-xmin)*(ymax-ymin).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

BoxLike = Sequence[float]


def iou(a: BoxLike, b: BoxLike) -> float:
    """Intersection over union of two boxes; 0.0 when either is empty or they do not touch."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def match_boxes(pred: Sequence[BoxLike], truth: Sequence[BoxLike], threshold: float = 0.5
                ) -> tuple[float, float, float, list[tuple[int, int, float]]]:
    """Match predictions to truth one-to-one (Hungarian on IoU), keeping pairs with IoU >= threshold.

    Returns (recall, precision, mean IoU of the kept matches, matches as (pred_idx, truth_idx, iou)).
    With nothing to find, recall is 1.0; with nothing predicted, precision is 1.0; with no match,
    mean IoU is 0.0 -- so empty cases neither crash nor look perfect where they are not.
    """
    matches: list[tuple[int, int, float]] = []
    if len(pred) and len(truth):
        m = np.array([[iou(p, t) for t in truth] for p in pred])
        rows, cols = linear_sum_assignment(-m)
        matches = [(int(r), int(c), float(m[r, c])) for r, c in zip(rows, cols) if m[r, c] >= threshold]
    recall = len(matches) / len(truth) if len(truth) else 1.0
    precision = len(matches) / len(pred) if len(pred) else 1.0
    mean_iou = float(np.mean([m[2] for m in matches])) if matches else 0.0
    return recall, precision, mean_iou, matches
