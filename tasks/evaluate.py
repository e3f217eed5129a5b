"""Evaluate: score the trained model on one split (params evaluate.split) with scikit-learn.

Balanced accuracy and macro F1 are reported next to accuracy because white-cell classes
are very unequal in real smears (neutrophils dominate, basophils are rare): a model that
ignores a rare class barely moves accuracy but shows in those two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hemaflow.config import EvaluateParams
from hemaflow.errors import StageInputError
from hemaflow.model_folder import LABELS_FILE, open_model_folder
from hemaflow.tasks.train import find_unreadable, make_image_dataset, prepare_output_dir, read_dataset

PREDICTION_COLUMNS = ("path", "label", "predicted", "confidence")


@dataclass
class EvalResult:
    eval_dir: Path
    split: str
    n: int
    metrics: dict[str, float]                                          # accuracy, balanced_accuracy, macro_f1
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> precision/recall/f1/support

    def summary(self) -> dict:
        return {"split": self.split, "images": self.n, **{k: round(v, 4) for k, v in self.metrics.items()},
                "metrics": str(self.eval_dir / "metrics.json")}

    @property
    def markdown(self) -> str:
        """Per-class table for a Prefect artifact or a PR comment."""
        lines = [
            f"**{self.split}** split, {self.n} images: accuracy {self.metrics['accuracy']:.3f}, "
            f"balanced accuracy {self.metrics['balanced_accuracy']:.3f}, macro F1 {self.metrics['macro_f1']:.3f}",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---:|---:|---:|---:|",
        ]
        for cls, m in self.per_class.items():
            lines.append(f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {int(m['support'])} |")
        return "\n".join(lines) + "\n"


def score_predictions(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> tuple[dict, dict, np.ndarray]:
    """Overall metrics, per-class metrics and the confusion matrix (rows = true, columns = predicted)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = s > 0  # macro F1 over classes that occur in this split, like balanced accuracy
    overall = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f[present])) if present.any() else 0.0,
    }
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                 for i, c in enumerate(classes)}
    return overall, per_class, confusion_matrix(y_true, y_pred, labels=labels)


@dataclass
class SplitPredictions:
    """One model's class probabilities on one split of a dataset, row-aligned with `paths`."""
    paths: list[str]           # relative to the dataset folder, as in dataset.parquet
    labels: list[str]          # true class names
    probs: np.ndarray          # (n, len(classes)) softmax outputs
    classes: tuple[str, ...]   # the model's class list (column order of probs)

    @property
    def y_true(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[c] for c in self.labels], dtype=int)

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def predict_split(model_dir: Path, dataset_dir: Path, split: str, folder=None) -> SplitPredictions:
    """Predict every image of `split` in dataset_dir/dataset.parquet with the model in model_dir
    (sha256-verified, safe_mode load). Used by evaluate, and by promote to re-score the
    production model on the same images as the challenger."""
    model_dir, dataset_dir = Path(model_dir), Path(dataset_dir)
    folder = folder or open_model_folder(model_dir)
    classes = folder.classes
    dataset_path = dataset_dir / "dataset.parquet"
    df = read_dataset(dataset_path, classes, classes_from=f"the model's {LABELS_FILE}")
    part = df[df["split"] == split].reset_index(drop=True)
    if part.empty:
        raise StageInputError(dataset_path, f"no rows with split == '{split}' to evaluate")

    import tensorflow as tf

    model = folder.load()
    index = {c: i for i, c in enumerate(classes)}
    paths = [str(dataset_dir / p) for p in part["path"]]
    y_true = np.array([index[c] for c in part["label"]])
    try:
        probs = model.predict(make_image_dataset(paths, y_true, folder.image_size, batch_size=64), verbose=0)
    except tf.errors.OpError:
        bad = find_unreadable(paths)
        if bad:
            raise StageInputError(bad[0], f"image listed in {dataset_path.name} cannot be decoded: {bad[1]}") from None
        raise
    return SplitPredictions(paths=list(part["path"]), labels=list(part["label"]), probs=np.asarray(probs),
                            classes=classes)


def evaluate_model(model_dir: Path, dataset_dir: Path, eval_dir: Path, cfg: EvaluateParams) -> EvalResult:
    """Predict cfg.split with model_dir/model.keras; write metrics.json, confusion_matrix.png,
    confusion.csv and predictions.csv into eval_dir."""
    model_dir, dataset_dir, eval_dir = Path(model_dir), Path(dataset_dir), Path(eval_dir)
    pred = predict_split(model_dir, dataset_dir, cfg.split)
    classes, probs, y_true, y_pred = pred.classes, pred.probs, pred.y_true, pred.y_pred
    n = len(pred.paths)
    overall, per_class, cm = score_predictions(y_true, y_pred, classes)

    prepare_output_dir(eval_dir, model_dir, dataset_dir)
    pd.DataFrame({"path": pred.paths, "label": pred.labels, "predicted": [classes[i] for i in y_pred],
                  "confidence": probs.max(axis=1).round(6)}, columns=list(PREDICTION_COLUMNS)) \
        .to_csv(eval_dir / "predictions.csv", index=False)
    pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=list(classes)).to_csv(eval_dir / "confusion.csv")
    metrics = {"split": cfg.split, "n": n, **overall, "per_class": per_class}
    (eval_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(cm, classes, eval_dir / "confusion_matrix.png",
                          title=f"{cfg.split} split: accuracy {overall['accuracy']:.2f}, "
                                f"balanced {overall['balanced_accuracy']:.2f} (n={n})")
    return EvalResult(eval_dir=eval_dir, split=cfg.split, n=n, metrics=overall, per_class=per_class)


def plot_confusion_matrix(cm: np.ndarray, classes: tuple[str, ...], png_path: Path, title: str = "") -> None:
    """Counts in each cell, colour = fraction of the true class (so rare classes stay visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
