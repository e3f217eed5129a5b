"""The evaluation's pictures, as PNG files a person would rather look at than read:
confusion matrix, reliability diagram, gallery of misclassified crops, rank of the true
class among the errors."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: np.ndarray, classes: tuple[str, ...], png_path: Path, title: str = "") -> None:
    """Counts in each cell, colour = fraction of the true class (so rare classes stay visible)."""
    plt = _plt()
    row_sums = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.3 * n + 2.5, 1.1 * n + 2), constrained_layout=True)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=12,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=35, ha="right")
    ax.set_yticks(range(n), [f"{c} ({int(row_sums[i, 0])})" for i, c in enumerate(classes)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (images)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of true class", shrink=0.8)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def plot_reliability(bins: list[dict], ece: float, png_path: Path, title: str = "") -> None:
    """Accuracy per confidence bin against the diagonal (perfect calibration), with the
    number of images per bin underneath: bars below the line are over-confident."""
    plt = _plt()
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True, constrained_layout=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    lo = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    acc = np.array([b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["confidence"] is not None else np.nan for b in bins])
    counts = np.array([b["images"] for b in bins])
    ax.bar(lo, acc, width=width, align="edge", color="tab:blue", edgecolor="white", label="accuracy in bin")
    used = counts > 0
    gap_lo = np.minimum(acc, np.nan_to_num(conf))
    ax.bar(lo[used], np.abs(acc - np.nan_to_num(conf))[used], bottom=gap_lo[used], width=width[used], align="edge",
           facecolor="none", edgecolor="tab:red", hatch="//", linewidth=0.8,
           label="gap to the mean confidence (bar above the dot: under-confident)")
    ax.plot((lo + width / 2)[used], conf[used], "o", color="tab:red", markersize=4, label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}  ECE {ece:.3f}".strip())
    ax.legend(loc="upper left", fontsize=8)
    axn.bar(lo, counts, width=width, align="edge", color="tab:grey", edgecolor="white")
    axn.set_yscale("log" if counts.max(initial=0) > 50 else "linear")
    axn.set_xlabel("top-1 confidence")
    axn.set_ylabel("images")
    axn.set_xlim(0, 1)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def plot_error_gallery(images: Sequence[np.ndarray], true_labels: Sequence[str],
                       top3: Sequence[Sequence[tuple[str, float]]], png_path: Path, title: str = "") -> None:
    """Misclassified crops (RGB arrays), each captioned with its true class and the model's
    top-3 probabilities. An empty gallery still writes a PNG that says so."""
    plt = _plt()
    n = len(images)
    cols = min(6, max(1, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.ravel():
        ax.axis("off")
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12)
    for ax, img, truth, top in zip(axes.ravel(), images, true_labels, top3):
        ax.imshow(img)
        lines = [f"true: {truth}"] + [f"{i + 1}. {c} {p:.2f}" for i, (c, p) in enumerate(top)]
        ax.set_title("\n".join(lines), fontsize=8, loc="left", color="black")
    fig.suptitle(title)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_rank_histogram(ranks: np.ndarray, n_classes: int, png_path: Path, title: str = "") -> None:
    """Among the errors, where the true class ranked (2 = the runner-up): mostly 2 means the
    model hesitates between neighbours; spread out means it is lost."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8), constrained_layout=True)
    values = np.arange(2, n_classes + 1)
    counts = np.array([(ranks == v).sum() for v in values])
    ax.bar(values, counts, color="tab:purple")
    for v, c in zip(values, counts):
        ax.text(v, c, str(int(c)), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(values)
    ax.set_xlabel("rank of the true class among the predicted probabilities")
    ax.set_ylabel("misclassified images")
    ax.set_title(title or f"true-class rank over {int(len(ranks))} errors")
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
