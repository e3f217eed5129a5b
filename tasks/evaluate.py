"""Evaluate: score the trained model on one split (params evaluate.split), and on an
external labelled folder when one is given (evaluate.test_data / --test-data).

Reported: accuracy, balanced accuracy, macro F1, per-class precision/recall/F1/AUC, macro
one-vs-rest AUC, top-3 accuracy, expected calibration error; pictures: confusion matrix,
reliability diagram, gallery of misclassified crops with their top-3, histogram of the true
class's rank among errors. With evaluate.tta the probabilities are the mean over the 8
flips/90-degree rotations of each crop. metrics.json carries the model's sha256 so its
figures can never be used to promote another model.

The external folder goes through the same ingest, label validation and segmentation as the
training data (the stage code itself, with the same params); images whose content hash is
in the training dataset are dropped from it and counted, so the external figure is honest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hemaflow.config import EvaluateParams, Params
from hemaflow.errors import StageInputError, read_table
from hemaflow.eval_plots import plot_confusion_matrix, plot_error_gallery, plot_rank_histogram, plot_reliability
from hemaflow.model_folder import LABELS_FILE, open_model_folder
from hemaflow.review import ReviewItem, write_review
from hemaflow.scoring import log_loss, one_vs_rest_auc, reliability, score_predictions, top_k_accuracy, true_class_ranks
from hemaflow.tasks.train import find_unreadable, make_image_dataset, prepare_output_dir, read_dataset
from hemaflow.tta import predict_probs

PREDICTION_COLUMNS = ("path", "label", "predicted", "confidence", "true_class_rank", "top3")
LABEL_REVIEW = "label_review.csv"
CROP_COLUMNS = ("path", "source_path", "x0", "y0", "x1", "y1")
EXTERNAL_DIR = "external"

__all__ = ["evaluate_model", "predict_split", "predict_paths", "score_predictions", "EvalResult",
           "SplitPredictions", "CropSources", "PREDICTION_COLUMNS"]


@dataclass(frozen=True)
class CropSources:
    """Where scored crops were cut from: the segment stage's crops.parquet (crop path, source path,
    box) and the folder its source paths are relative to. The label review shows the whole source
    image with the crop outlined, because a crop can hide what a label refers to (a PBC 'platelet'
    image whose platelets lie outside the centred crop, a second cell at its edge)."""
    table: Path
    raw_dir: Path

    def boxes(self, crops: list[str]) -> dict[str, tuple[str, tuple[int, int, int, int]]]:
        """crop path -> (source path as the manifest writes it, (x0, y0, x1, y1) in that source) for
        the given crops; empty when there are none or the table is absent (a dataset evaluated
        without its crops folder, as in the GPU job, still gets a sheet, of the crops alone)."""
        if not crops or not Path(self.table).is_file():
            return {}
        df = read_table(self.table, "crops table", CROP_COLUMNS)
        df = df.loc[df["path"].isin(crops), list(CROP_COLUMNS)]
        return {r.path: (r.source_path, (int(r.x0), int(r.y0), int(r.x1), int(r.y1))) for r in df.itertuples(index=False)}

    def source_file(self, rel: str) -> Path:
        """A source path as a person would open it (params paths keep their '..': examples/../../shared)."""
        return Path(os.path.normpath(self.raw_dir)) / rel

    def tile(self, crop: Path, source: tuple[str, tuple[int, int, int, int]] | None) -> np.ndarray:
        """BGR tile: the whole source image with the crop outlined in green (and, for an annotated
        object of a field such as 'a.jpg#42,345,185,480', the field with the object's box in orange),
        else the crop when the source is unknown or cannot be read."""
        from hemaflow.contact_sheet import draw_boxes
        from hemaflow.errors import SourceReadError
        from hemaflow.imageio import parse_box_path, read_image

        if source is not None:
            rel, box = source
            obj, outlines = parse_box_path(rel), []
            if obj is not None:  # the crop box is relative to the object's region of the field
                rel, region = obj
                box = (box[0] + region[0], box[1] + region[1], box[2] + region[0], box[3] + region[1])
                outlines.append((region, (0, 140, 255)))
            try:
                image = read_image(self.raw_dir, rel)
            except SourceReadError:
                image = None  # the picture falls back to the crop; the review row still names the source
            if image is not None:
                thick = max(2, max(image.shape[:2]) // 150)
                for b, colour in outlines + [(box, (0, 170, 0))]:
                    image = draw_boxes(image, [b], colour, thickness=thick)
                return image
        return _read_bgr(crop)


@dataclass
class EvalResult:
    eval_dir: Path
    split: str
    n: int
    metrics: dict[str, float]                                          # accuracy, balanced_accuracy, macro_f1, ...
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> precision/recall/f1/support/auc
    external: dict | None = None                                       # the same figures on --test-data

    def summary(self) -> dict:
        out = {"split": self.split, "images": self.n,
               **{k: round(v, 4) for k, v in self.metrics.items() if isinstance(v, float)},
               "metrics": str(self.eval_dir / "metrics.json")}
        if self.external:
            out.update({f"external {k}": (round(v, 4) if isinstance(v, float) else v)
                        for k, v in self.external.items() if k in ("n", "accuracy", "balanced_accuracy", "folder",
                                                                    "dropped_seen_in_training")})
        return out

    @property
    def markdown(self) -> str:
        """Per-class table for a Prefect artifact or a PR comment."""
        m = self.metrics
        lines = [
            f"**{self.split}** split, {self.n} images: accuracy {m['accuracy']:.3f}, "
            f"balanced accuracy {m['balanced_accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, "
            f"macro AUC {_fmt(m.get('macro_auc'))}, ECE {_fmt(m.get('ece'))}"
            + (" (test-time augmentation)" if m.get("tta") else ""),
        ]
        if self.external:
            e = self.external
            lines.append(f"\n**external** folder `{e['folder']}`, {e['n']} crops: accuracy {e['accuracy']:.3f}, "
                         f"balanced accuracy {e['balanced_accuracy']:.3f} "
                         f"({e['dropped_seen_in_training']} image(s) seen in training dropped)")
        lines += ["", "| class | precision | recall | F1 | AUC | support |", "|---|---:|---:|---:|---:|---:|"]
        for cls, c in self.per_class.items():
            lines.append(f"| {cls} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {_fmt(c.get('auc'))} "
                         f"| {int(c['support'])} |")
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


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


def predict_paths(folder, image_paths: list[str], labels: list[str], tta: bool = False,
                  table: Path | None = None) -> np.ndarray:
    """Probabilities of the model in `folder` on image files (a decode failure names the file)."""
    import tensorflow as tf

    model = folder.load()
    index = {c: i for i, c in enumerate(folder.classes)}
    y = np.array([index[c] for c in labels], dtype=np.int32)
    try:
        return predict_probs(model, make_image_dataset(image_paths, y, folder.image_size, batch_size=64), tta=tta)
    except tf.errors.OpError:
        bad = find_unreadable(image_paths)
        if bad:
            where = f"image listed in {table.name}" if table else "image"
            raise StageInputError(bad[0], f"{where} cannot be decoded: {bad[1]}") from None
        raise


def predict_split(model_dir: Path, dataset_dir: Path, split: str, folder=None, tta: bool = False) -> SplitPredictions:
    """Predict every image of `split` in dataset_dir/dataset.parquet with the model in model_dir
    (sha256-verified, safe_mode load). Used by evaluate, and by promote to re-score the
    production model on the same images as the challenger."""
    model_dir, dataset_dir = Path(model_dir), Path(dataset_dir)
    folder = folder or open_model_folder(model_dir)
    dataset_path = dataset_dir / "dataset.parquet"
    df = read_dataset(dataset_path, folder.classes, classes_from=f"the model's {LABELS_FILE}")
    part = df[df["split"] == split].reset_index(drop=True)
    if part.empty:
        raise StageInputError(dataset_path, f"no rows with split == '{split}' to evaluate")
    probs = predict_paths(folder, [str(dataset_dir / p) for p in part["path"]], list(part["label"]), tta=tta,
                          table=dataset_path)
    return SplitPredictions(paths=list(part["path"]), labels=list(part["label"]), probs=probs, classes=folder.classes)


def score_probabilities(pred: SplitPredictions, bins: int) -> tuple[dict, dict, np.ndarray, list[dict]]:
    """Every figure evaluate reports, from one model's probabilities on one set of images."""
    y_true, probs, classes = pred.y_true, pred.probs, pred.classes
    overall, per_class, cm = score_predictions(y_true, pred.y_pred, classes)
    macro_auc, aucs = one_vs_rest_auc(y_true, probs)
    ece, rel_bins = reliability(y_true, probs, bins)
    for c, auc in zip(classes, aucs):
        per_class[c]["auc"] = auc
    overall.update({"macro_auc": macro_auc, "ece": ece, "top3_accuracy": top_k_accuracy(y_true, probs, 3),
                    "log_loss": log_loss(y_true, probs)})
    return overall, per_class, cm, rel_bins


def write_report(out_dir: Path, pred: SplitPredictions, image_root: Path, cfg: EvaluateParams, name: str,
                 sources: CropSources | None = None) -> dict:
    """predictions.csv, confusion.csv, reliability.csv, the label review and the pictures for one
    scored set; returns its metrics (overall figures + per_class)."""
    overall, per_class, cm, rel_bins = score_probabilities(pred, cfg.calibration_bins)
    classes, probs = pred.classes, pred.probs
    ranks = true_class_ranks(pred.y_true, probs)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    top3 = [[(classes[j], float(probs[i, j])) for j in row] for i, row in enumerate(order)]
    pd.DataFrame({"path": pred.paths, "label": pred.labels, "predicted": [classes[i] for i in pred.y_pred],
                  "confidence": probs.max(axis=1).round(6), "true_class_rank": ranks,
                  "top3": [";".join(f"{c}:{p:.4f}" for c, p in t) for t in top3]},
                 columns=list(PREDICTION_COLUMNS)).to_csv(out_dir / "predictions.csv", index=False)
    pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=list(classes)).to_csv(out_dir / "confusion.csv")
    pd.DataFrame(rel_bins).to_csv(out_dir / "reliability.csv", index=False)
    n = len(pred.paths)
    plot_confusion_matrix(cm, classes, out_dir / "confusion_matrix.png",
                          title=f"{name}: accuracy {overall['accuracy']:.3f} (95% CI {overall['accuracy_ci95_low']:.3f}-"
                                f"{overall['accuracy_ci95_high']:.3f}), balanced {overall['balanced_accuracy']:.3f} (n={n})")
    plot_reliability(rel_bins, overall["ece"], out_dir / "reliability_diagram.png", title=f"{name}: reliability")
    is_wrong = pred.y_pred != pred.y_true
    n_wrong = int(is_wrong.sum())
    wrong = np.flatnonzero(is_wrong)
    wrong = wrong[np.argsort(-probs[wrong].max(axis=1), kind="stable")][: cfg.gallery_size]  # most confident first
    plot_error_gallery([_read_rgb(image_root / pred.paths[i]) for i in wrong], [pred.labels[i] for i in wrong],
                       [top3[i] for i in wrong], out_dir / "error_gallery.png",
                       title=f"{name}: {n_wrong} misclassified of {n}"
                             + (f" (the {len(wrong)} most confident)" if len(wrong) < n_wrong else ""))
    n_review = len(write_label_review(pred, image_root, cfg.label_review_confidence, out_dir / LABEL_REVIEW,
                                      sources, max_shown=cfg.gallery_size))
    errors = ranks[is_wrong]
    plot_rank_histogram(errors, len(classes), out_dir / "error_ranks.png",
                        title=f"{name}: rank of the true class over {len(errors)} errors")
    return {**overall, "label_review": n_review,
            "error_rank_counts": {str(r): int((errors == r).sum()) for r in range(2, len(classes) + 1)},
            "per_class": per_class}


def write_label_review(pred: SplitPredictions, image_root: Path, min_confidence: float, path: Path,
                       sources: CropSources | None = None, max_shown: int = 24) -> pd.DataFrame:
    """The errors the model is sure of (predicted-class probability >= min_confidence) as a
    review list for a person to check each label (nothing is relabelled here), and next to it (the
    same name as .png) a sheet of those images, most confident first: the whole source image with the crop outlined
    when `sources` knows it, else the crop.
    On PBC the images every 64 px model got wrong with p > 0.99 were a 'platelet' showing a small
    nucleated cell and a 'monocyte' that looks like a lymphocyte: label noise, not model error."""
    probs, y_true, y_pred = pred.probs, pred.y_true, pred.y_pred
    conf = probs.max(axis=1)
    rows = np.flatnonzero((y_pred != y_true) & (conf >= min_confidence))
    rows = rows[np.argsort(-conf[rows], kind="stable")]
    boxes = sources.boxes([pred.paths[i] for i in rows]) if sources is not None else {}
    items, tiles, captions = [], [], []
    for i in rows:
        label, called = pred.labels[i], pred.classes[y_pred[i]]
        source = boxes.get(pred.paths[i])
        where = f"; source {sources.source_file(source[0])}, crop box {source[1]}" if source else ""
        items.append(ReviewItem("evaluate", pred.paths[i], str(image_root / pred.paths[i]), "confident_disagreement",
                                f"labelled {label}; the model says {called} with probability {conf[i]:.3f} "
                                f"({label}: {probs[i, y_true[i]]:.3f}){where}; check the label"))
        if len(tiles) < max_shown:
            crop = image_root / pred.paths[i]
            tiles.append(sources.tile(crop, source) if sources is not None else _read_bgr(crop))
            captions.append(f"{Path(pred.paths[i]).stem}: {label} -> {called} {conf[i]:.2f}")
    from hemaflow.contact_sheet import save_grid

    shown = f" (the {len(tiles)} most confident)" if len(tiles) < len(rows) else ""
    title = (f"label review: {len(rows)} error{'s' * (len(rows) > 1)} called with p >= {min_confidence:g}{shown}; "
             "label -> model"
             if len(rows) else f"label review: no error called with p >= {min_confidence:g}")
    save_grid(Path(path).with_suffix(".png"), tiles, captions, cols=4, tile_size=240, title=title)
    return write_review(items, path)  # sorted by reason and item there


def _read_bgr(path: Path) -> np.ndarray:
    """A crop for a picture; a white square if it cannot be read (the picture is not the place to fail)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return np.full((8, 8, 3), 255, np.uint8) if img is None else img


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    return cv2.cvtColor(_read_bgr(path), cv2.COLOR_BGR2RGB)


def evaluate_model(model_dir: Path, dataset_dir: Path, eval_dir: Path, cfg: EvaluateParams,
                   test_data: Path | None = None, params: Params | None = None,
                   sources: CropSources | None = None) -> EvalResult:
    """Score cfg.split (and the external folder test_data, read with params' ingest/validate/segment
    settings); write metrics.json, predictions.csv, confusion.csv, reliability.csv, the label review
    and the pictures into eval_dir (the external set's into eval_dir/external). `sources` says where
    the split's crops were cut from, for the label review sheet."""
    model_dir, dataset_dir, eval_dir = Path(model_dir), Path(dataset_dir), Path(eval_dir)
    folder = open_model_folder(model_dir)
    pred = predict_split(model_dir, dataset_dir, cfg.split, folder=folder, tta=cfg.tta)
    prepare_output_dir(eval_dir, model_dir, dataset_dir)
    metrics = write_report(eval_dir, pred, dataset_dir, cfg, f"{cfg.split} split", sources)
    external = None
    if test_data is not None:
        from hemaflow.tasks.external_test import prepare_external

        ext_dir = eval_dir / EXTERNAL_DIR
        ext = prepare_external(Path(test_data), ext_dir, params or Params(), dataset_dir / "dataset.parquet",
                               folder.classes)
        ext_pred = SplitPredictions(paths=ext.paths, labels=ext.labels, classes=folder.classes,
                                    probs=predict_paths(folder, [str(ext.crops_dir / p) for p in ext.paths], ext.labels,
                                                        tta=cfg.tta, table=ext.crops_dir / "crops.parquet"))
        ext_metrics = write_report(ext_dir, ext_pred, ext.crops_dir, cfg, "external test folder",
                                   CropSources(ext.crops_dir / "crops.parquet", Path(test_data)))
        external = {"folder": str(test_data), "n": len(ext.paths), **ext.counts, **ext_metrics}
        (ext_dir / "metrics.json").write_text(json.dumps(external, indent=2) + "\n")
    n = len(pred.paths)
    record = {"split": cfg.split, "n": n, "model_sha256": folder.sha256, "tta": cfg.tta,
              "inference_precision": folder.precision, **metrics}
    if external is not None:
        record["external"] = {k: v for k, v in external.items() if k != "per_class"}
    (eval_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    per_class = metrics.pop("per_class")
    overall = {k: v for k, v in metrics.items() if isinstance(v, float)}
    return EvalResult(eval_dir=eval_dir, split=cfg.split, n=n, metrics={**overall, "tta": cfg.tta},
                      per_class=per_class, external=external)
